"""Metrics: FID, CLIP score, video alignment and consistency, and the shapes judge."""
