"""Training loops: the diffusion trainer, and contrastive CLIP training for the shapes world."""
