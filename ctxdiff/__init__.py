"""ctxdiff: ContextDiff (ICLR 2024), cross-modal contextualized diffusion models."""

__version__ = "0.1.0"
