"""FateZero-style attention storing and fusion (Qi et al. 2023) for the inflated video U-Net.

During inversion `AttentionRecorder` keeps the self- and cross-attention probabilities of the
low-resolution sites (at most `LOW_RES_FRACTION` of the frame side: FateZero keeps the 16x16
and 32x32 layers of a 64x64 latent), per diffusion step t, in float16 (on the CPU if asked).
During editing `AttentionEditor` fuses them into the sampling run at the same steps:

- self-attention, for the first `self_replace` fraction of the steps: the stored map replaces the
  editing one, except inside the blend mask M, where the editing map is kept (FateZero's
  attention blending: s = M * s_edit + (1 - M) * s_src); applied to both halves of a guided
  batch, since a self-attention map describes the source video's layout, not a prompt;
- cross-attention, for the first `cross_replace` fraction, in the conditional half only:
  "replace" (prompt-to-prompt word swap, prompts of equal token count) takes the stored map
  column by column; "refine" takes the stored map for the target tokens aligned with a source
  token and keeps the editing map for new tokens, then renormalises.

The blend mask M is the source prompt's stored cross-attention on the edited words, averaged
over heads, sites and steps, scaled to a maximum of 1 per frame and thresholded (FateZero: 0.3);
or any mask the caller brings (pipelines/edit_mask.py: DiffEdit's), at the largest stored grid.

A clip longer than the model's window runs window by window (pipelines/video_denoiser.py): the
caller sets `window` before each call; the recorder then keeps the maps of each window's own frames
in one map per site for the whole clip, and the editor hands each call the rows of its frames.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from difflib import SequenceMatcher

import torch
import torch.nn.functional as F

LOW_RES_FRACTION = 0.5


def map_key(t: int, site: str, kind: str, chain: str = "") -> str:
    """The name of a stored map: step, site (module path) and kind ("self" or "cross"); EDICT's two
    denoiser calls of a step are told apart by the chain they move ("x", "y")."""
    return f"t{t:05d}.{chain + '.' if chain else ''}{site}.{kind}"


def _grid(queries: int) -> int:
    side = math.isqrt(queries)
    if side * side != queries:
        raise ValueError(f"attention over {queries} positions is not a square grid; frames must be square")
    return side


class AttentionRecorder:
    """Stores the attention probabilities of the sites with at most `max_queries` positions,
    under the step `t` the caller sets before each denoiser call (the last call at a step wins)."""

    def __init__(self, image_size: int, on_cpu: bool = False, fraction: float = LOW_RES_FRACTION,
                 frames: int | None = None):
        self.max_queries = int(image_size * fraction) ** 2
        self.on_cpu = on_cpu
        self.maps: dict[str, torch.Tensor] = {}
        self.t = 0
        self.frames = frames          # the clip's frame count (needed when it runs in windows)
        self.window = None            # the FrameWindow of the current call (None: every frame)
        self.chain = ""               # EDICT: the chain the current call moves

    def wants(self, site: str, kind: str, queries: int) -> bool:
        return queries <= self.max_queries

    def __call__(self, site: str, kind: str, probs: torch.Tensor) -> torch.Tensor:
        kept = probs.detach().to(dtype=torch.float16, device="cpu" if self.on_cpu else probs.device)
        key = map_key(self.t, site, kind, self.chain)
        if self.window is None or self.window.context == 0 and len(self.window.frames) == self.frames:
            self.maps[key] = kept
            return probs
        if key not in self.maps:
            self.maps[key] = torch.zeros((self.frames, *kept.shape[1:]), dtype=kept.dtype, device=kept.device)
        own = torch.tensor(self.window.own, device=kept.device)
        self.maps[key][own] = kept[self.window.context:]
        return probs

    def has_step(self, t: int) -> bool:
        prefix = f"t{t:05d}."
        return any(key.startswith(prefix) for key in self.maps)


@dataclass(frozen=True)
class TokenAlignment:
    """How the target prompt's cross-attention columns (null key first) relate to the source's.

    source_of[j]: the source column that target column j takes its stored map from;
    aligned[j]: 1 where target column j has a source counterpart (refine keeps the editing map
    where it is 0); edited: source columns of the words the edit changes (the blend mask's words).
    """

    source_of: torch.Tensor
    aligned: torch.Tensor
    edited: tuple[int, ...]


def align_tokens(source_ids: list[int], target_ids: list[int], columns: int, mode: str,
                 first: int = 1) -> TokenAlignment:
    """Columns for prompts given as token ids (start to end token) in a cross-attention of
    `columns` keys whose column `first` holds the start token (pixel U-Nets: 1, after the null key;
    Stable Diffusion: 0). "replace" maps column j to column j (prompts of equal token count);
    "refine" follows the longest common token runs (difflib)."""
    source_of = torch.arange(columns)
    aligned = torch.ones(columns) if mode == "replace" else torch.zeros(columns)
    aligned[:first] = 1.0  # the null key
    matched_source: set[int] = set()
    for block in SequenceMatcher(None, source_ids, target_ids, autojunk=False).get_matching_blocks():
        for k in range(block.size):
            matched_source.add(first + block.a + k)
            if mode == "refine":
                source_of[first + block.b + k] = first + block.a + k
                aligned[first + block.b + k] = 1.0
    if mode == "refine":   # padding after the end token (SD 1.x: end-token copies that carry attention)
        for j in range(first + len(target_ids), columns):
            source = first + len(source_ids) + (j - first - len(target_ids))
            if source < columns:
                source_of[j], aligned[j] = source, 1.0
    edited = tuple(first + i for i in range(len(source_ids)) if first + i not in matched_source)
    return TokenAlignment(source_of, aligned, edited)


def attention_side(maps: dict[str, torch.Tensor]) -> int:
    """The side S of the largest stored cross-attention grid (the blend mask's grid)."""
    return max(_grid(m.shape[2]) for key, m in maps.items() if key.endswith(".cross"))


def blend_mask(maps: dict[str, torch.Tensor], columns: tuple[int, ...], threshold: float,
               device: torch.device, span: bool = False) -> torch.Tensor | None:
    """M [F, S, S] (bool) from the stored source cross-attention on `columns`, averaged over
    heads, sites and steps at the largest stored grid S, scaled to max 1 per frame, > threshold
    (`span`: scaled to [0, 1] per frame, (a - min) / (max - min), so a floor of attention that every
    cell gets does not count). None when no column is edited (a reconstruction: everything is replaced)."""
    if not columns:
        return None
    cross = [m for key, m in maps.items() if key.endswith(".cross")]
    if not cross:
        return None
    side = attention_side(maps)
    total = None
    for m in cross:
        weight = m.to(device=device, dtype=torch.float32)[..., list(columns)].sum(-1).mean(1)   # [F, N]
        grid = weight.view(weight.shape[0], 1, _grid(weight.shape[1]), -1)
        grid = F.interpolate(grid, size=(side, side), mode="bilinear", align_corners=False)[:, 0]
        total = grid if total is None else total + grid
    low = total.flatten(1).amin(1)[:, None, None] if span else torch.zeros_like(total[:, :1, :1])
    scaled = (total - low) / (total.flatten(1).amax(1)[:, None, None] - low).clamp_min(1e-12)
    return scaled > threshold


@dataclass(frozen=True)
class FusionPlan:
    """When and how stored maps enter the editing run (fractions of the sampling steps)."""

    self_replace: float = 0.5
    cross_replace: float = 0.8
    cross_mode: str = "replace"


class AttentionEditor:
    """Fuses stored inversion maps into the sampling run (see the module docstring).

    `timesteps` are the sampling steps in the order they run; the caller sets `t` before each
    denoiser call. `frames` is F; a guided batch holds [unconditional F; conditional F].
    """

    def __init__(self, maps: dict[str, torch.Tensor], timesteps: list[int], plan: FusionPlan,
                 alignment: TokenAlignment, mask: torch.Tensor | None, frames: int, device: torch.device):
        self.maps, self.plan, self.frames, self.device = maps, plan, frames, device
        self.index = {t: i for i, t in enumerate(timesteps)}
        self.self_steps = round(plan.self_replace * len(timesteps))
        self.cross_steps = round(plan.cross_replace * len(timesteps))
        self.source_of = alignment.source_of.to(device)
        self.aligned = alignment.aligned.to(device)
        self.mask = mask
        self._site_masks: dict[int, torch.Tensor] = {}
        self.t = timesteps[0]
        self.window = None            # the FrameWindow of the current call (None: every frame)
        self.chain = ""               # EDICT: the chain the current call moves

    def _rows(self, per_frame: torch.Tensor) -> torch.Tensor:
        """The rows [frames of this call, ...] of a per-clip-frame tensor."""
        if self.window is None or len(self.window.frames) == per_frame.shape[0] == self.frames \
                and self.window.context == 0:
            return per_frame
        return per_frame[torch.tensor(self.window.frames, device=per_frame.device)]

    @property
    def _call_frames(self) -> int:
        return self.frames if self.window is None else len(self.window.frames)

    def wants(self, site: str, kind: str, queries: int) -> bool:
        limit = self.self_steps if kind == "self" else self.cross_steps
        return self.index.get(self.t, limit) < limit and map_key(self.t, site, kind, self.chain) in self.maps

    def __call__(self, site: str, kind: str, probs: torch.Tensor) -> torch.Tensor:
        stored = self._rows(self.maps[map_key(self.t, site, kind, self.chain)]).to(device=probs.device,
                                                                                 dtype=probs.dtype)
        if kind == "self":
            return self._fuse_self(probs, stored)
        return self._fuse_cross(probs, stored)

    def _fuse_self(self, probs: torch.Tensor, stored: torch.Tensor) -> torch.Tensor:
        copies = probs.shape[0] // self._call_frames
        stored = stored.repeat(copies, 1, 1, 1)
        if self.mask is None:
            return stored
        keep = self._rows(self._mask_at(probs.shape[2])).repeat(copies, 1)[:, None, :, None]
        return torch.where(keep, probs, stored)

    def _mask_at(self, queries: int) -> torch.Tensor:
        """The blend mask [F, queries] at a site's grid."""
        if queries not in self._site_masks:
            side = _grid(queries)
            grid = F.interpolate(self.mask[:, None].float(), size=(side, side), mode="nearest")
            self._site_masks[queries] = grid.flatten(1).to(self.device) > 0.5
        return self._site_masks[queries]

    def _fuse_cross(self, probs: torch.Tensor, stored: torch.Tensor) -> torch.Tensor:
        n = self._call_frames
        conditional = probs[-n:]
        taken = stored[..., self.source_of]
        if self.plan.cross_mode == "replace":
            fused = taken
        else:
            fused = taken * self.aligned + conditional * (1 - self.aligned)
            fused = fused / fused.sum(-1, keepdim=True).clamp_min(1e-12)
        return torch.cat([probs[:-n], fused]) if probs.shape[0] > n else fused
