"""Does CLIP guidance at sampling time draw the asked shape? A probe (not a product feature): the
base stage (32 px) samples as usual (DDIM, classifier-free guidance, the bundle's defaults), and at
t in [tmin T, tmax T] each x0_hat is moved `iters` times by `scale` along the gradient of the
bundle CLIP's image-text cosine, low-passed by `pool` x `pool` averaging and scaled to unit RMS
(GLIDE guides with a noised CLIP; here the clean-image CLIP reads x0_hat). Judged on held-out
single-object prompts, as `default_model_quality.py --base-only` (same prompts and seeds).

    python benchmarks/clip_guidance_probe.py runs/shapes-shape-base/model.safetensors --n 100 0 0.3:1:0.8:0.3:4

Each setting is scale[:iters[:tmax[:tmin[:pool]]]] (defaults 1, 1.0, 0.2, 4); 0 is unguided.
"""

from __future__ import annotations

import argparse
import json

import torch
import torch.nn.functional as F

from ctxdiff.data.shapes import held_out_prompts
from ctxdiff.metrics.shapes_judge import judge_many
from ctxdiff.pipelines.batch_generate import sample_uint8
from ctxdiff.pipelines.text2image import Text2Image

DEFAULTS = (1.0, 1, 1.0, 0.2, 4)


def parse_setting(text: str) -> tuple[float, int, float, float, int]:
    parts = text.split(":")
    if len(parts) > len(DEFAULTS):
        raise argparse.ArgumentTypeError(f"a setting is scale[:iters[:tmax[:tmin[:pool]]]], got {text!r}")
    values = parts + [str(v) for v in DEFAULTS[len(parts):]]
    return float(values[0]), int(values[1]), float(values[2]), float(values[3]), int(values[4])


def clip_guided(x0_fn, pipe: Text2Image, text: torch.Tensor, setting):
    """x0_fn whose predictions at t in [tmin T, tmax T] climb the CLIP image-text cosine."""
    scale, iters, tmax, tmin, pool = setting
    T = pipe.sched.T

    def guided(x, cond, t):
        x0 = x0_fn(x, cond, t)
        if scale == 0 or not tmin * T <= int(t[0]) <= tmax * T:
            return x0
        for _ in range(iters):
            with torch.enable_grad():
                v = x0.detach().float().requires_grad_()
                grad, = torch.autograd.grad((pipe.clip.image_features(v) * text).sum(), v)
            if pool > 1:
                grad = F.interpolate(F.avg_pool2d(grad, pool), scale_factor=pool, mode="bilinear", align_corners=False)
            grad = grad / grad.flatten(1).pow(2).mean(1).sqrt().view(-1, 1, 1, 1).clamp_min(1e-12)
            x0 = (x0 + scale * grad).clamp(-1, 1)
        return x0

    return guided


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model")
    parser.add_argument("settings", nargs="+", type=parse_setting)
    parser.add_argument("--n", type=int, default=100)
    parser.add_argument("--batch", type=int, default=50)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    pipe = Text2Image.from_bundle(args.model, args.device)
    pipe.sr = None
    prompts = held_out_prompts(args.n, seed=2024, kind="single")
    for setting in args.settings:
        def guide(x0_fn, cond, setting=setting):
            return clip_guided(x0_fn, pipe, F.normalize(cond.pooled.float(), dim=-1), setting)

        images = sample_uint8(pipe, prompts, list(range(args.n)), pipe.defaults, args.batch, guide=guide)
        report = judge_many(list(images), prompts)
        print(json.dumps({"setting": dict(zip(("scale", "iters", "tmax", "tmin", "pool"), setting)),
                          **{r[1]: round(r[4], 3) for r in report.rows() if r[0] == "single"}}), flush=True)


if __name__ == "__main__":
    main()
