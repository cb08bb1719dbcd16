"""Documents generated from the code: the configuration reference."""
