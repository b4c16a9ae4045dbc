"""Small helpers shared by test modules."""

import torch


def perturbed(module: torch.nn.Module, scale: float = 0.05) -> torch.nn.Module:
    """Move every weight off its initialisation, so zero-initialised branches do something."""
    torch.manual_seed(1)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(scale * torch.randn_like(p))
    return module
