"""Pipelines compose models and samplers; they know nothing of the CLI."""
