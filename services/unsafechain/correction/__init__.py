"""The correction engine: unsafe completions rewritten in the same <think> format, re-judged."""
