"""The judge engine: safety verdicts on (prompt, completion) pairs."""
