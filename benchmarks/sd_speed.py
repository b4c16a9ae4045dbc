"""Stable Diffusion sampling speed: ctxdiff's own SD backbone against diffusers' StableDiffusionPipeline
on the same random SD-1.5-shaped weights (nothing is downloaded), the same scheduler (DDIM) and the
same number of steps, measured in one run; printed as a table with the ratio (issue 20's target:
ours >= 1.2x diffusers' it/s at 512x512, fp16, batch 1, classifier-free guidance).

Only the denoising loop is timed (latents out, no VAE decode), after a warm-up run; it/s is
steps / seconds, median of the repetitions. Prompt embeddings are given to diffusers directly (it
needs no tokenizer files that way); ours tokenises with open_clip's BPE as usual.

    python benchmarks/sd_speed.py --device cuda                    # SD 1.5 shapes, 512 px, fp16
    python benchmarks/sd_speed.py --tiny --steps 3 --reps 1        # a seconds-long CPU rehearsal
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch

SD15_UNET = dict(sample_size=64, cross_attention_dim=768, attention_head_dim=8)
SD15_TEXT = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                 max_position_embeddings=77, vocab_size=49408, hidden_act="quick_gelu", projection_dim=768)
TINY_UNET = dict(sample_size=8, cross_attention_dim=64, attention_head_dim=8, block_out_channels=(32, 64),
                 layers_per_block=1, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                 up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"))
TINY_TEXT = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=1,
                 max_position_embeddings=77, vocab_size=49408, hidden_act="quick_gelu", projection_dim=64)
TINY_VAE = dict(block_out_channels=(32, 32), layers_per_block=1, latent_channels=4,
                down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2)
SCHEDULER = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                 clip_sample=False, set_alpha_to_one=False, steps_offset=1, prediction_type="epsilon",
                 timestep_spacing="trailing")


def diffusers_pipeline(tiny: bool, folder: Path):
    """Random SD-1.5-shaped (or tiny) weights as a diffusers pipeline, also written to `folder`."""
    import diffusers
    import transformers

    torch.manual_seed(0)
    unet = diffusers.UNet2DConditionModel(**(TINY_UNET if tiny else SD15_UNET))
    vae = diffusers.AutoencoderKL(**(TINY_VAE if tiny else {}))
    text = transformers.CLIPTextModel(transformers.CLIPTextConfig(**(TINY_TEXT if tiny else SD15_TEXT)))
    pipe = diffusers.StableDiffusionPipeline(vae=vae, text_encoder=text, tokenizer=None, unet=unet,
                                             scheduler=diffusers.DDIMScheduler(**SCHEDULER), safety_checker=None,
                                             feature_extractor=None, requires_safety_checker=False)
    pipe.save_pretrained(folder, safe_serialization=True)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def seconds(run, reps: int, sync) -> float:
    run()                                   # warm-up: kernels, allocator, caches
    times = []
    for _ in range(reps):
        sync()
        start = time.perf_counter()
        run()
        sync()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--size", type=int, default=512, help="image side in pixels (tiny: 64)")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--guidance", type=float, default=7.5)
    parser.add_argument("--tiny", action="store_true", help="a tiny random SD (CPU rehearsal)")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()

    from dataclasses import replace

    from ctxdiff.pipelines.latent import LatentText2Image

    device = torch.device(args.device)
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    size = 64 if args.tiny and args.size == 512 else args.size
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    with tempfile.TemporaryDirectory() as tmp:
        theirs = diffusers_pipeline(args.tiny, Path(tmp)).to(device, dtype)
        ours = LatentText2Image.from_checkpoint(tmp, device=device, dtype=dtype, height=size, width=size)
        params = replace(ours.defaults, steps=args.steps, guidance=args.guidance, sampler="ddim", spacing="trailing")
        prompt = ["a cat in armor"]
        cond = ours.encode(prompt).tokens.to(dtype)
        uncond = ours.encode([""]).tokens.to(dtype)
        generator = torch.Generator(device="cpu").manual_seed(0)

        def run_theirs():
            theirs(prompt_embeds=cond, negative_prompt_embeds=uncond, height=size, width=size,
                   num_inference_steps=args.steps, guidance_scale=args.guidance, output_type="latent",
                   generator=generator)

        def run_ours():
            ours.sample_latents(prompt, [0], params)

        with torch.inference_mode():
            t_theirs = seconds(run_theirs, args.reps, sync)
            t_ours = seconds(run_ours, args.reps, sync)
    rows = [("diffusers StableDiffusionPipeline", t_theirs), ("ctxdiff LatentText2Image (r = 0)", t_ours)]
    record = {"device": str(device), "dtype": str(dtype).removeprefix("torch."), "size": size, "steps": args.steps,
              "tiny": args.tiny, **{("diffusers" if i == 0 else "ctxdiff") + "_it_per_s": args.steps / t
                                    for i, (_, t) in enumerate(rows)},
              "ratio": t_theirs / t_ours}
    if args.json:
        print(json.dumps(record))
        return
    print(f"{'pipeline':36s} {'s/image':>9s} {'it/s':>8s}   ({device}, {record['dtype']}, {size}px, "
          f"{args.steps} DDIM steps, guidance {args.guidance})")
    for name, t in rows:
        print(f"{name:36s} {t:9.3f} {args.steps / t:8.2f}")
    print(f"ours / diffusers it/s: {record['ratio']:.2f}x (target >= 1.2x at 512 px fp16 on a GPU)")


if __name__ == "__main__":
    main()
