"""The evaluation pipeline: benchmarks, generation and judging of several models, scoring, metrics and the report."""
