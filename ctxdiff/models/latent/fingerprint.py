"""Which Stable Diffusion backbone a latent adapter belongs to: a fingerprint of the loaded weights.

An adapter trained over a frozen backbone learns a shift that *that* backbone's U-Net reads well
(Eq. 6 is minimised through it), so it must be used with the same weights. The bytes of the file
are the wrong key: one model ships as .ckpt, .safetensors, pruned fp16 or a diffusers folder, and
hashing gigabytes would slow every start. The fingerprint is therefore taken from the weights:

- `architecture`: SHA-256 of every parameter's name and shape (exact);
- `probe`: `PROBES` values of every parameter at evenly spaced positions (float32), compared with a
  relative tolerance `RTOL` = 1e-2: a float16 or bfloat16 copy (relative rounding <= 2^-9) matches;
  another training of the same architecture does not (its weights differ by far more).
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import nn

PROBES = 8
RTOL, ATOL = 1e-2, 1e-5


@dataclass(frozen=True)
class Fingerprint:
    architecture: str     # sha256 hex of parameter names and shapes
    probe: torch.Tensor   # float32 [PROBES per parameter], on the CPU

    def same_architecture(self, other: "Fingerprint") -> bool:
        return self.architecture == other.architecture

    def same_weights(self, other: "Fingerprint") -> bool:
        return (self.same_architecture(other) and self.probe.shape == other.probe.shape
                and torch.allclose(self.probe, other.probe, rtol=RTOL, atol=ATOL))


@torch.no_grad()
def fingerprint(modules: Mapping[str, nn.Module]) -> Fingerprint:
    """The fingerprint of `modules` (e.g. {"unet": ..., "vae": ..., "text": ...}), by name order."""
    digest = hashlib.sha256()
    probes = []
    for module_name in sorted(modules):
        for name, param in sorted(modules[module_name].named_parameters()):
            digest.update(f"{module_name}.{name}:{tuple(param.shape)};".encode())
            flat = param.detach().reshape(-1)
            positions = torch.linspace(0, flat.numel() - 1, min(PROBES, flat.numel()), device=flat.device)
            probes.append(flat[positions.round().long()].float())
    probe = torch.cat(probes).cpu() if probes else torch.zeros(0)
    return Fingerprint(digest.hexdigest(), probe)
