"""What a video editor is judged by besides CLIP scores: fidelity to the source and temporal stability.

- `psnr`, `ssim`: against the source, over whole frames or within a mask (reconstruction; the
  regions an edit should leave alone). SSIM is Wang et al. 2004's, Gaussian window (sigma 1.5,
  11 taps), K1 = 0.01, K2 = 0.03, per RGB channel, as skimage's `structural_similarity` with
  `gaussian_weights=True, use_sample_covariance=False` (borders reflected instead of cropped);
  within a mask it is the mean of the SSIM map there.
- `warp_error`: Lai et al. 2018's E_warp, as TokenFlow and Rerender-A-Video report it: optical flow of
  the *source* (OpenCV's DIS, or Farneback) warps each edited frame onto the next; the squared RGB
  distance (channels in [0, 1]) is averaged over the pixels the flow sees in both frames
  (forward-backward consistency, Sundaram et al. 2010), then over frame pairs. A clip that moves like its source
  scores ~0; flicker and motion that the source does not have score high.

Frames are uint8 [F, H, W, 3] (or one [H, W, 3] frame); masks bool [F, H, W] or [H, W].
"""

from __future__ import annotations

import numpy as np
from scipy.ndimage import gaussian_filter

from ctxdiff.errors import CtxdiffError

FLOWS = ("dis", "farneback")


def _frames(frames: np.ndarray, name: str) -> np.ndarray:
    frames = np.asarray(frames)
    if frames.ndim == 3:
        frames = frames[None]
    if frames.ndim != 4 or frames.shape[-1] != 3:
        raise CtxdiffError(f"{name}: frames must be [F, H, W, 3] RGB, not {list(frames.shape)}")
    return frames


def _pair(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    a, b = _frames(a, "edited"), _frames(b, "source")
    if a.shape != b.shape:
        raise CtxdiffError(f"cannot compare frames {list(a.shape)} with {list(b.shape)}; pass videos of one "
                           "length and size")
    return a.astype(np.float64), b.astype(np.float64)


def _mask(mask: np.ndarray | None, shape: tuple[int, ...]) -> np.ndarray | None:
    """A bool mask [F, H, W] for frames of `shape` [F, H, W, 3] (a [H, W] mask applies to every frame)."""
    if mask is None:
        return None
    mask = np.asarray(mask, dtype=bool)
    mask = np.broadcast_to(mask, shape[:3]) if mask.ndim == 2 else mask
    if mask.shape != shape[:3]:
        raise CtxdiffError(f"a mask {list(mask.shape)} does not fit frames {list(shape[:3])}")
    if not mask.any():
        raise CtxdiffError("the mask selects no pixel")
    return mask


def psnr(edited: np.ndarray, source: np.ndarray, mask: np.ndarray | None = None) -> float:
    """Peak signal-to-noise ratio in dB (peak 255) over all frames, or within `mask`; inf when equal."""
    a, b = _pair(edited, source)
    squared = ((a - b) ** 2).mean(-1)
    m = _mask(mask, a.shape)
    mse = float(squared[m].mean() if m is not None else squared.mean())
    return float("inf") if mse == 0 else float(10 * np.log10(255.0 ** 2 / mse))


def ssim_map(edited: np.ndarray, source: np.ndarray) -> np.ndarray:
    """The SSIM map [F, H, W] (channel mean) of Wang et al. 2004 with a Gaussian window."""
    a, b = _pair(edited, source)
    c1, c2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2

    def blur(x: np.ndarray) -> np.ndarray:   # per frame and channel, sigma 1.5, radius 5 (11 taps)
        return gaussian_filter(x, sigma=(0, 1.5, 1.5, 0), truncate=3.5, mode="reflect")

    mu_a, mu_b = blur(a), blur(b)
    var_a, var_b = blur(a * a) - mu_a ** 2, blur(b * b) - mu_b ** 2
    cov = blur(a * b) - mu_a * mu_b
    s = ((2 * mu_a * mu_b + c1) * (2 * cov + c2)) / ((mu_a ** 2 + mu_b ** 2 + c1) * (var_a + var_b + c2))
    return s.mean(-1)


def ssim(edited: np.ndarray, source: np.ndarray, mask: np.ndarray | None = None) -> float:
    """Mean SSIM over all frames, or within `mask`; 1 when equal."""
    s = ssim_map(edited, source)
    m = _mask(mask, s.shape + (3,))
    return float(s[m].mean() if m is not None else s.mean())


def optical_flow(first: np.ndarray, second: np.ndarray, method: str = "dis") -> np.ndarray:
    """Dense flow [H, W, 2] (x, y) from frame `first` to `second` (uint8 RGB): first(p) ~ second(p + flow(p))."""
    import cv2

    a, b = (cv2.cvtColor(np.ascontiguousarray(f, dtype=np.uint8), cv2.COLOR_RGB2GRAY) for f in (first, second))
    if method == "dis":
        dis = cv2.DISOpticalFlow_create(cv2.DISOPTICAL_FLOW_PRESET_MEDIUM)
        return dis.calc(a, b, None)
    if method == "farneback":
        levels = max(0, min(3, int(np.log2(min(a.shape) / 8))))
        return cv2.calcOpticalFlowFarneback(a, b, None, 0.5, levels, 15, 3, 5, 1.2, 0)
    raise CtxdiffError(f"unknown optical flow {method!r}; choose one of {', '.join(FLOWS)}")


def _warp(image: np.ndarray, flow: np.ndarray) -> np.ndarray:
    """image sampled at p + flow(p) (bilinear, borders replicated)."""
    import cv2

    h, w = flow.shape[:2]
    grid_x, grid_y = np.meshgrid(np.arange(w, dtype=np.float32), np.arange(h, dtype=np.float32))
    return cv2.remap(image.astype(np.float32), grid_x + flow[..., 0], grid_y + flow[..., 1], cv2.INTER_LINEAR,
                     borderMode=cv2.BORDER_REPLICATE)


def visible_mask(backward: np.ndarray, forward: np.ndarray) -> np.ndarray:
    """Pixels of the second frame whose backward flow is undone by the forward flow (not occluded):
    |b + f(p + b)|^2 < 0.01 (|b|^2 + |f(p + b)|^2) + 0.5 (Sundaram et al. 2010)."""
    f_at = _warp(forward, backward)
    gap = ((backward + f_at) ** 2).sum(-1)
    return gap < 0.01 * ((backward ** 2).sum(-1) + (f_at ** 2).sum(-1)) + 0.5


def warp_error(edited: np.ndarray, source: np.ndarray, method: str = "dis") -> float:
    """Mean over frame pairs (i, i+1) of the mean squared difference (RGB in [0, 1]) between edited frame
    i+1 and edited frame i warped onto it by the source's flow (the squared RGB distance, channels in [0, 1],
    summed over channels), over the pixels visible in both (Lai et al. 2018)."""
    a, b = _frames(edited, "edited"), _frames(source, "source")
    if len(a) != len(b) or len(a) < 2:
        raise CtxdiffError(f"warp error needs two videos of one length >= 2 frames, not {len(a)} and {len(b)}")
    if a.shape[1:3] != b.shape[1:3]:
        raise CtxdiffError(f"edited frames {list(a.shape[1:3])} and source frames {list(b.shape[1:3])} differ in "
                           "size; compare at one size")
    errors = []
    for i in range(len(a) - 1):
        backward = optical_flow(b[i + 1], b[i], method)   # frame i+1 -> frame i
        forward = optical_flow(b[i], b[i + 1], method)
        visible = visible_mask(backward, forward)
        warped = _warp(a[i].astype(np.float32) / 255, backward)
        squared = ((a[i + 1].astype(np.float32) / 255 - warped) ** 2).sum(-1)
        errors.append(float(squared[visible].mean()) if visible.any() else 0.0)
    return float(np.mean(errors))


def fidelity_scores(edited: np.ndarray, source: np.ndarray, keep: np.ndarray | None = None,
                    flow: str = "dis") -> dict[str, float]:
    """PSNR and SSIM against the source (whole frames, and within `keep`, the pixels the edit should leave
    alone, when given) and, for two frames or more, the warp error by the source's flow."""
    record = {"psnr": psnr(edited, source), "ssim": ssim(edited, source)}
    if keep is not None and np.asarray(keep).any():
        record.update(psnr_kept=psnr(edited, source, keep), ssim_kept=ssim(edited, source, keep))
    if len(_frames(edited, "edited")) >= 2:
        record["warp_error"] = warp_error(edited, source, flow)
    return record
