"""Running model-written code where it can do no harm (see :mod:`.runner`)."""
