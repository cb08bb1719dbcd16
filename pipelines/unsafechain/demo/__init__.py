"""The demo: bundled sample prompts, its build configuration and the stand-in models."""
