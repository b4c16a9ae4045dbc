"""`ctxdiff generate "a cat in armor" [...]`: text-to-image from a t2i bundle (default: the bundled model),
or from a Stable Diffusion checkpoint with an optional latent adapter (`--model sd.safetensors --adapter FILE`)."""

from __future__ import annotations

import random
import re
from dataclasses import asdict, replace
from enum import Enum
from pathlib import Path

import typer

from ctxdiff.cli.app import app, options
from ctxdiff.cli.common import (check_finite, check_output, check_seed, check_steps, image_seed, model_files, pick_device,
                                read_stdin)
from ctxdiff.cli.output import emit_json, info, print_table, progress_bar, warn
from ctxdiff.errors import CtxdiffError, UsageError


class Sampler(str, Enum):
    ddim = "ddim"
    ddpm = "ddpm"


def read_prompts(prompts: list[str], from_file: Path | None) -> list[str]:
    """Prompts from arguments, a file (one per line), or stdin for '-'; blank lines are skipped.
    Text that is not UTF-8 is one line naming the file (or stdin), line and column."""
    from ctxdiff.data.images import read_text

    lines: list[str] = []
    for prompt in prompts:
        lines += read_stdin().splitlines() if prompt == "-" else [prompt]
    if from_file is not None:
        lines += read_text(from_file, "prompts file").splitlines()
    cleaned = [line.strip() for line in lines if line.strip()]
    if not cleaned:
        raise UsageError("no prompts: pass them as arguments, with --from-file FILE, or '-' to read stdin")
    return cleaned


def safe_stem(prompt: str, limit: int = 60) -> str:
    """A file-name part from a prompt: lowercase words joined by '-', no path separators or
    control characters, at most `limit` characters, never empty."""
    slug = re.sub(r"[^a-z0-9]+", "-", prompt.lower()).strip("-")
    return slug[:limit].rstrip("-") or "prompt"


def _multiple_of_8(value: int | None) -> int | None:
    """--height/--width: Stable Diffusion's VAE works on 8 x 8 pixel cells."""
    if value is not None and value % 8:
        raise typer.BadParameter(f"{value} is not a multiple of 8 (the VAE's 8 x 8 pixel cells); try {value // 8 * 8 or 8}")
    return value


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
    height: int = typer.Option(None, "--height", min=8, max=8192, callback=_multiple_of_8, help="SD checkpoints: image height in pixels (default: 512 for SD 1.x)."),
    width: int = typer.Option(None, "--width", min=8, max=8192, callback=_multiple_of_8, help="SD checkpoints: image width in pixels (default: 512 for SD 1.x)."),
    vae_tiling: bool = typer.Option(False, "--vae-tiling", help="SD checkpoints: decode in 512-pixel tiles (less memory)."),
    num: int = typer.Option(1, "--num", "-n", min=1, max=100_000, help="Images per prompt."),
    seed: int = typer.Option(None, "--seed", callback=check_seed, help="Seed of the first image, 0 .. 2**64-1 (random when omitted; always recorded)."),
    steps: int = typer.Option(None, "--steps", min=1, help="Sampling steps of the base stage (default: the model's)."),
    sr_steps: int = typer.Option(None, "--sr-steps", min=1, help="Sampling steps of the super-resolution stage."),
    sampler: Sampler = typer.Option(None, "--sampler", help="ddim (Eq. 9/11) or ddpm (Eq. 7)."),
    eta: float = typer.Option(None, "--eta", min=0.0, callback=check_finite, help="DDIM stochasticity (0: deterministic)."),
    guidance: float = typer.Option(None, "--guidance", "-g", min=0.0, callback=check_finite, help="Classifier-free guidance weight."),
    no_adapter: bool = typer.Option(False, "--no-adapter", help="Sample with r = 0 (plain diffusion), same code path."),
    out: Path = typer.Option(Path("outputs"), "--out", "-o", help="Output folder."),
    grid_: bool = typer.Option(False, "--grid", help="Also write grid.png of all images."),
    batch_size: int = typer.Option(16, "--batch-size", min=1, help="Images sampled at once."),
    force: bool = typer.Option(False, "--force", help="Write into a folder that already holds files."),
) -> None:
    """Generate images from text prompts (PNG text chunks carry prompt, seed and parameters)."""
    from ctxdiff.data.png import grid, save_png, to_uint8

    texts = read_prompts(prompts or [], from_file)
    check_output(out, "folder", force=force, empty=True)
    model_path = model or default_model()
    pipe = _pipeline(model_path, adapter, height, width, vae_tiling)
    d = pipe.defaults
    has_adapter = _has_adapter(pipe)
    # params.adapter records what runs (and is written to the JSON line and PNG): an adapter is used
    # only when the model has one and --no-adapter is not given; without one, r = 0 either way.
    params = replace(d, sampler=sampler.value if sampler else d.sampler, steps=steps or d.steps,
                     sr_steps=sr_steps or d.sr_steps, eta=d.eta if eta is None else eta,
                     guidance=d.guidance if guidance is None else guidance, adapter=has_adapter and not no_adapter)
    check_steps(params.steps, pipe.sched.T, "--steps")
    check_steps(params.sr_steps, pipe.sched.T, "--sr-steps")
    if no_adapter and not has_adapter:
        warn("this model has no adapter; --no-adapter changes nothing")
    notes = vocabulary_warnings(model_path, texts) if not _is_sd(pipe) else {}
    for note in notes.values():
        warn(note)
    first_seed = seed if seed is not None else random.SystemRandom().randrange(2**31)
    jobs = [(p, image_seed(first_seed, i * num + j)) for i, p in enumerate(texts) for j in range(num)]
    out.mkdir(parents=True, exist_ok=True)
    records, images_all = [], []
    with progress_bar("generate", len(jobs) and pipe.total_steps(params) * -(-len(jobs) // batch_size)) as bar:
        for start in range(0, len(jobs), batch_size):
            batch = jobs[start:start + batch_size]
            images = to_uint8(pipe.sample([p for p, _ in batch], [s for _, s in batch], params, progress=bar))
            for k, ((prompt, image_seed_), image) in enumerate(zip(batch, images)):
                index = start + k
                meta = {"prompt": prompt, "seed": image_seed_, **asdict(params), "model": str(model_path),
                        **({"adapter_file": str(adapter)} if adapter else {}),
                        "size": f"{image.shape[1]}x{image.shape[0]}"}
                path = save_png(out / f"{index:05d}-{safe_stem(prompt)}-{image_seed_}.png", image, meta)
                record = {"path": str(path), **meta, "warnings": [notes[prompt]] if prompt in notes else []}
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


def vocabulary_warnings(model: Path, prompts: list[str]) -> dict[str, str]:
    """prompt -> one warning line, for the prompts with words a model trained on the shapes world
    has no meaning for (it still draws them: the words are simply not understood)."""
    from ctxdiff.formats.t2i import DEFAULT_MODEL, trained_on
    from ctxdiff.shapes.captions import unknown_words

    if trained_on(model) != "shapes":
        return {}
    bundled = Path(model).resolve() == DEFAULT_MODEL.resolve()
    who = "the bundled model only knows" if bundled else f"{model} was trained on"
    notes = {}
    for prompt in dict.fromkeys(prompts):
        words = unknown_words(prompt)
        if words:
            notes[prompt] = (f"{prompt!r}: {who} the shapes world (circles, squares, triangles and crosses in nine "
                             f"colours) and has no meaning for {', '.join(map(repr, words))}; for other pictures "
                             "pass a real checkpoint with --model (e.g. a Stable Diffusion .safetensors)")
    return notes


def _is_sd(pipe) -> bool:
    from ctxdiff.pipelines.text2image import Text2Image

    return not isinstance(pipe, Text2Image)


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

    if not model.exists():
        raise CtxdiffError(f"{model}: no such model file or folder; pass --model (a t2i bundle from `ctxdiff train`, "
                           "or a Stable Diffusion checkpoint or diffusers folder)")
    if is_sd_model(model):
        device = pick_device()
        with model_files(model, adapter):
            return LatentText2Image.from_checkpoint(model, adapter, device=device, height=height, width=width,
                                                    vae_tiling=vae_tiling)
    given = [flag for flag, value in (("--adapter", adapter), ("--height", height), ("--width", width),
                                      ("--vae-tiling", vae_tiling)) if value]
    if given:
        raise UsageError(f"{', '.join(given)}: only for Stable Diffusion checkpoints; {model} is a ctxdiff t2i bundle "
                         "(it carries its own adapter and size)")
    device = pick_device()
    with model_files(model):
        return Text2Image.from_bundle(model, device)
