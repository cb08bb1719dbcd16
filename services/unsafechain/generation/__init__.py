"""The generation engine: K completions per prompt from the reasoning model."""
