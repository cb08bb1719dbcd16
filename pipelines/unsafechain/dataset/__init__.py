"""The dataset pipeline: prompts through generate, judge, route and correct into a dataset."""
