"""Where an edit may change the clip, and keeping the rest: the blend mask and local blending.

Three masks M [F, S, S] (bool, True = edited):

- "attention" (FateZero): the source prompt's stored cross-attention on the edited words
  (`attention_control.blend_mask`), at the attention grid (8x8 on the bundled 32 px model),
  scaled to max 1 per frame and thresholded;
- "attention-span": the same map scaled to [0, 1] per frame ((a - min) / (max - min): on the
  bundled model every cell gets 35-55% of the peak, so max-scaling at 0.3 keeps every cell),
  thresholded and grown by one cell;
- "diffedit" (Couairon et al. 2022, DiffEdit): where the denoiser's predictions under the two
  prompts disagree. The source frames are noised to step t (the context-aware forward process,
  Eq. 1, with the source prompt's bias), x0 is predicted under the source and the target prompt,
  and the eps each implies (Eq. 11, with each prompt's own bias) is compared:

      D = mean over draws and channels of |eps_hat(x_t, c_tgt, t) - eps_hat(x_t, c_src, t)|

  then scaled per frame to [0, 1] (D / max D) and thresholded. Model-agnostic, at the denoiser's
  own resolution; prompts that agree give D = 0 and an empty mask.

`keep_source` is local blending (Prompt-to-Prompt / FateZero's latent blend): after every sampling
step t -> s the state outside M is replaced by the source's own inverted state at s,

      x_s <- M * x_s + (1 - M) * x_s^src,

where x^src is the inversion's trajectory (it is the state the sampler runs on: x_t with the
adapter's bias k_t r_phi in it), and at s = 0 the source frames themselves; so outside the mask
the output is the source. EDICT's second chain y is replaced by the same x^src (the inversion
keeps y only at t_N; the chains differ by the mixing only).
"""

from __future__ import annotations

from itertools import pairwise

import torch
import torch.nn.functional as F

from ctxdiff.diffusion.process import context_bias, ddim_step, predicted_noise, q_sample
from ctxdiff.diffusion.samplers import EDICT_MIX, edict_step
from ctxdiff.diffusion.schedule import Schedule

MASK_SOURCES = ("attention", "attention-span", "diffedit")
DIFFEDIT_STEP = 0.5      # DiffEdit's encoding ratio: noise to t = 0.5 T
DIFFEDIT_DRAWS = 4       # noise draws averaged (DiffEdit: 10)


def dilate(mask: torch.Tensor, cells: int = 1) -> torch.Tensor:
    """M [F, S, S] grown by `cells` in every direction (3x3 max-pool per cell)."""
    if cells <= 0:
        return mask
    grown = F.max_pool2d(mask[:, None].float(), 2 * cells + 1, stride=1, padding=cells)
    return grown[:, 0] > 0.5


@torch.no_grad()
def diffedit_map(x0_fn, x0: torch.Tensor, cond_src, cond_tgt, sched: Schedule, *, adapter=None,
                 step: float = DIFFEDIT_STEP, draws: int = DIFFEDIT_DRAWS, seed: int = 0) -> torch.Tensor:
    """D [F, H, W] in [0, 1]: |eps_tgt - eps_src| averaged over `draws` noise draws at t = step * T and
    over channels, scaled to max 1 per frame (all 0 where the prompts' predictions agree).

    x0_fn(x_t, cond, t) -> x0_hat and adapter(x0, cond, t) -> r as for the samplers; x0 [F, C, H, W]."""
    t = max(1, round(step * sched.T))
    batch = torch.full((x0.shape[0],), t, dtype=torch.long, device=x0.device)
    generator = torch.Generator(device="cpu").manual_seed(seed)
    total = torch.zeros((x0.shape[0], *x0.shape[2:]), dtype=torch.float32, device=x0.device)
    for _ in range(draws):
        noise = torch.randn(x0.shape, generator=generator).to(device=x0.device, dtype=x0.dtype)
        x_t = q_sample(sched, x0, batch, adapter, cond_src, noise=noise)
        eps = []
        for cond in (cond_src, cond_tgt):
            x0_hat = x0_fn(x_t, cond, batch)
            eps.append(predicted_noise(sched, x_t, batch, x0_hat, bias_t=context_bias(sched, x0_hat, batch, adapter,
                                                                                           cond)))
        total += (eps[1] - eps[0]).abs().float().mean(1)
    peak = total.flatten(1).amax(1)[:, None, None]
    return torch.where(peak > 1e-6, total / peak.clamp_min(1e-12), torch.zeros_like(total))


def threshold_map(scaled: torch.Tensor, threshold: float, grow: int = 1) -> torch.Tensor:
    """M = dilate(scaled > threshold, grow): the cells of a per-frame [0, 1] map above `threshold`."""
    return dilate(scaled > threshold, grow)


def at_grid(mask: torch.Tensor, side: int) -> torch.Tensor:
    """M [F, S, S] at side x side: nearest when growing, any-cell (max-pool) when shrinking, so a small
    region never vanishes from a coarser grid."""
    if mask.shape[-1] == side:
        return mask
    m = mask[:, None].float()
    if side > mask.shape[-1]:
        return F.interpolate(m, size=(side, side), mode="nearest")[:, 0] > 0.5
    return F.adaptive_max_pool2d(m, side)[:, 0] > 0.5


class SourceKeeper:
    """Local blending: `keep(x, s)` puts the source's state at step s outside the mask M.

    `states` maps each sampling step s (t_N .. t_1 and 0) to the source's state there [F, C, H, W];
    `mask` is M [F, h, w] (True: the edit's), taken to the state's grid."""

    def __init__(self, states: dict[int, torch.Tensor], mask: torch.Tensor):
        self.states = states
        self.mask = mask
        self._at: dict[tuple, torch.Tensor] = {}

    def _mask_like(self, x: torch.Tensor) -> torch.Tensor:
        key = (x.shape[-1], x.device, x.dtype)
        if key not in self._at:
            self._at[key] = at_grid(self.mask.to(x.device), x.shape[-1])[:, None].to(x.dtype)
        return self._at[key]

    def keep(self, x: torch.Tensor, s: int) -> torch.Tensor:
        source = self.states[s].to(device=x.device, dtype=x.dtype)
        m = self._mask_like(x)
        return m * x + (1 - m) * source


@torch.no_grad()
def sample_kept(x0_fn, start, timesteps: list[int], sched: Schedule, keeper: SourceKeeper, *, adapter=None,
                cond=None, method: str = "ddim", mix: float = EDICT_MIX, on_half=None, progress=None):
    """The inversion's sampler (Eq. 11, or EDICT's chains from the pair `start`) along decreasing
    `timesteps`, with `keeper.keep` after every step (both chains for EDICT); returns x_0."""
    state = start
    for t, s in pairwise(timesteps):
        if method == "edict":
            x, y = edict_step(sched, x0_fn, *state, t, s, adapter, cond, mix, on_half)
            state = (keeper.keep(x, s), keeper.keep(y, s))
        else:
            batch = torch.full((state.shape[0],), t, dtype=torch.long, device=state.device)
            state = keeper.keep(ddim_step(sched, state, t, s, x0_fn(state, cond, batch), adapter, cond), s)
        if progress is not None:
            progress.advance()
    return state[0] if method == "edict" else state
