"""The files ctxdiff writes and reads, one module per kind (docs/formats.md): t2i bundles (`t2i`),
latent adapters over Stable Diffusion (`latent_adapter`), one-shot tuned video files (`tuned`) and
video inversions (`inversion`); `model_ref` names a base model by path and content. Every kind is
a safetensors file with JSON metadata (`ctxdiff.checkpoints.save_bundle`)."""
