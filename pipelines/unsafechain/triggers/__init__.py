"""What follows the platform's events: a finished build triggers its training run."""
