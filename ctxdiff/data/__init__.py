"""Datasets: image-text folders, manifests and shards, video I/O, and the synthetic shapes world."""
