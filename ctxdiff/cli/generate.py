"""`ctxdiff generate "a cat in armor" [...]`: text-to-image from a t2i bundle (default: the bundled model),
or from a Stable Diffusion checkpoint with an optional latent adapter (`--model sd.safetensors --adapter FILE`)."""

from __future__ import annotations

import random
import re
import sys
from dataclasses import asdict, replace
from enum import Enum
from pathlib import Path

import typer

from ctxdiff.cli.app import app, options
from ctxdiff.cli.common import ensure_writable_folder, pick_device
from ctxdiff.cli.output import emit_json, info, print_table, progress_bar, warn
from ctxdiff.errors import CtxdiffError, UsageError


class Sampler(str, Enum):
    ddim = "ddim"
    ddpm = "ddpm"


def read_prompts(prompts: list[str], from_file: Path | None) -> list[str]:
    """Prompts from arguments, a file (one per line), or stdin for '-'; blank lines are skipped."""
    lines: list[str] = []
    for prompt in prompts:
        lines += sys.stdin.read().splitlines() if prompt == "-" else [prompt]
    if from_file is not None:
        try:
            lines += from_file.read_text(encoding="utf-8").splitlines()
        except OSError as exc:
            raise UsageError(f"{from_file}: cannot read the prompt file ({exc.strerror})") from None
    cleaned = [line.strip() for line in lines if line.strip()]
    if not cleaned:
        raise UsageError("no prompts: pass them as arguments, with --from-file FILE, or '-' to read stdin")
    return cleaned


def safe_stem(prompt: str, limit: int = 60) -> str:
    """A file-name part from a prompt: lowercase words joined by '-', no path separators or
    control characters, at most `limit` characters, never empty."""
    slug = re.sub(r"[^a-z0-9]+", "-", prompt.lower()).strip("-")
    return slug[:limit].rstrip("-") or "prompt"


def default_model() -> Path:
    from ctxdiff.formats.t2i import DEFAULT_MODEL

    if not DEFAULT_MODEL.exists():
        raise CtxdiffError(f"the bundled default model is missing ({DEFAULT_MODEL}); reinstall ctxdiff, "
                           "or pass --model FILE")
    return DEFAULT_MODEL


@app.command()
def generate(
    prompts: list[str] = typer.Argument(None, help="Prompts; '-' reads one prompt per line from stdin."),
    from_file: Path = typer.Option(None, "--from-file", help="Read prompts from a file, one per line."),
    model: Path = typer.Option(None, "--model", "-m", help="A t2i bundle from `ctxdiff train`, or an SD 1.x/2.x checkpoint or diffusers folder (default: the bundled model)."),
    adapter: Path = typer.Option(None, "--adapter", help="A latent adapter (`ctxdiff train`, `latent:` recipe) for the SD checkpoint of --model."),
    height: int = typer.Option(None, "--height", min=8, help="SD checkpoints: image height in pixels (default: 512 for SD 1.x)."),
    width: int = typer.Option(None, "--width", min=8, help="SD checkpoints: image width in pixels (default: 512 for SD 1.x)."),
    vae_tiling: bool = typer.Option(False, "--vae-tiling", help="SD checkpoints: decode in 512-pixel tiles (less memory)."),
    num: int = typer.Option(1, "--num", "-n", min=1, help="Images per prompt."),
    seed: int = typer.Option(None, "--seed", help="Seed of the first image (random when omitted; always recorded)."),
    steps: int = typer.Option(None, "--steps", min=1, help="Sampling steps of the base stage (default: the model's)."),
    sr_steps: int = typer.Option(None, "--sr-steps", min=1, help="Sampling steps of the super-resolution stage."),
    sampler: Sampler = typer.Option(None, "--sampler", help="ddim (Eq. 9/11) or ddpm (Eq. 7)."),
    eta: float = typer.Option(None, "--eta", min=0.0, help="DDIM stochasticity (0: deterministic)."),
    guidance: float = typer.Option(None, "--guidance", "-g", min=0.0, help="Classifier-free guidance weight."),
    no_adapter: bool = typer.Option(False, "--no-adapter", help="Sample with r = 0 (plain diffusion), same code path."),
    out: Path = typer.Option(Path("outputs"), "--out", "-o", help="Output folder."),
    grid_: bool = typer.Option(False, "--grid", help="Also write grid.png of all images."),
    batch_size: int = typer.Option(16, "--batch-size", min=1, help="Images sampled at once."),
    force: bool = typer.Option(False, "--force", help="Write into a folder that already holds files."),
) -> None:
    """Generate images from text prompts (PNG text chunks carry prompt, seed and parameters)."""
    from ctxdiff.data.png import grid, save_png, to_uint8

    texts = read_prompts(prompts or [], from_file)
    ensure_writable_folder(out, force)
    model_path = model or default_model()
    pipe = _pipeline(model_path, adapter, height, width, vae_tiling)
    d = pipe.defaults
    has_adapter = _has_adapter(pipe)
    # params.adapter records what runs (and is written to the JSON line and PNG): an adapter is used
    # only when the model has one and --no-adapter is not given; without one, r = 0 either way.
    params = replace(d, sampler=sampler.value if sampler else d.sampler, steps=steps or d.steps,
                     sr_steps=sr_steps or d.sr_steps, eta=d.eta if eta is None else eta,
                     guidance=d.guidance if guidance is None else guidance, adapter=has_adapter and not no_adapter)
    if params.steps > pipe.sched.T or params.sr_steps > pipe.sched.T:
        raise UsageError(f"--steps must be at most the model's {pipe.sched.T} diffusion steps")
    if no_adapter and not has_adapter:
        warn("this model has no adapter; --no-adapter changes nothing")
    first_seed = seed if seed is not None else random.SystemRandom().randrange(2**31)
    jobs = [(p, first_seed + i * num + j) for i, p in enumerate(texts) for j in range(num)]
    out.mkdir(parents=True, exist_ok=True)
    records, images_all = [], []
    with progress_bar("generate", len(jobs) and pipe.total_steps(params) * -(-len(jobs) // batch_size)) as bar:
        for start in range(0, len(jobs), batch_size):
            batch = jobs[start:start + batch_size]
            images = to_uint8(pipe.sample([p for p, _ in batch], [s for _, s in batch], params, progress=bar))
            for k, ((prompt, image_seed), image) in enumerate(zip(batch, images)):
                index = start + k
                meta = {"prompt": prompt, "seed": image_seed, **asdict(params), "model": str(model_path),
                        **({"adapter_file": str(adapter)} if adapter else {}),
                        "size": f"{image.shape[1]}x{image.shape[0]}"}
                path = save_png(out / f"{index:05d}-{safe_stem(prompt)}-{image_seed}.png", image, meta)
                record = {"path": str(path), **meta}
                emit_json(record)
                records.append(record)
                images_all.append(image)
    if grid_:
        import numpy as np

        save_png(out / "grid.png", grid(np.stack(images_all), columns=num if num > 1 else None),
                 {"prompts": texts, "first_seed": first_seed, **asdict(params)})
    if not options().json:
        print_table(f"{len(records)} image(s) in {out}", ["file", "prompt", "seed"],
                    [[Path(r["path"]).name, r["prompt"], r["seed"]] for r in records])
    info(f"seed {first_seed}" + (" (random)" if seed is None else ""))


def _has_adapter(pipe) -> bool:
    """Whether any stage of the pipeline has an adapter (`Text2Image.has_adapter` asks the base
    stage only; a bundle's super-resolution stage may have its own)."""
    sr = getattr(pipe, "sr", None)
    return pipe.has_adapter or (sr is not None and sr.adapter is not None)


def _pipeline(model: Path, adapter: Path | None, height: int | None, width: int | None, vae_tiling: bool):
    """A t2i bundle's cascade, or a Stable Diffusion checkpoint (with its latent adapter) in latent space."""
    from ctxdiff.pipelines.latent import LatentText2Image
    from ctxdiff.formats.latent_adapter import is_sd_model
    from ctxdiff.pipelines.text2image import Text2Image

    if is_sd_model(model):
        return LatentText2Image.from_checkpoint(model, adapter, device=pick_device(), height=height, width=width,
                                                vae_tiling=vae_tiling)
    given = [flag for flag, value in (("--adapter", adapter), ("--height", height), ("--width", width),
                                      ("--vae-tiling", vae_tiling)) if value]
    if given:
        raise UsageError(f"{', '.join(given)}: only for Stable Diffusion checkpoints; {model} is a ctxdiff t2i bundle "
                         "(it carries its own adapter and size)")
    return Text2Image.from_bundle(model, pick_device())
