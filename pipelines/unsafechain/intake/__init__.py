"""Prompt intake: sources, published loaders, deduplication and decontamination."""
