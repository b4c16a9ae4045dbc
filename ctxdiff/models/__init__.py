"""Networks: pixel U-Nets, the context-aware adapter, open_clip encoders, the latent SD backbone."""
