"""`ctxdiff generate "a cat in armor" [...]`: text-to-image from a t2i bundle (default: the bundled model),
or from a Stable Diffusion checkpoint with an optional latent adapter (`--model sd.safetensors --adapter FILE`)
and LoRAs; DDIM, DDPM or a context-aware solver; negative prompts; img2img and inpainting.

Under `torchrun --nproc_per_node N -m ctxdiff generate ...` the batches are dealt out to the ranks
(ctxdiff/distributed.py): every image keeps the seed and file name it has in one process, so N ranks
write the files one process writes. Each rank prints the JSON lines of its own images as it makes
them; rank 0 alone prints warnings, the progress of its share, the table of all images and the seed,
and writes --grid.
"""

from __future__ import annotations

import random
import re
from dataclasses import asdict, replace
from contextlib import nullcontext
from pathlib import Path

import typer

from ctxdiff.cli.app import app, options
from ctxdiff.cli.common import (check_finite, check_output, check_sampler, check_seed, check_steps, check_strength,
                                image_seed, lora_specs, model_files, pick_device, read_stdin)
from ctxdiff.cli.output import emit_json, info, print_table, progress_bar, warn
from ctxdiff.errors import CtxdiffError, UsageError


# SampleConfig.SAMPLERS (ctxdiff.recipes, not imported at CLI start; tests/test_cli_generate.py keeps them equal)
SOLVERS = ("dpmpp-2m", "dpmpp-2m-sde", "euler", "euler-a", "heun", "unipc")
SAMPLERS = ("ddim", "ddpm", *SOLVERS, *(f"{s}-karras" for s in SOLVERS))
DEFAULT_STRENGTH = 0.8


def read_prompts(prompts: list[str], from_file: Path | None, negative: str = "") -> list[tuple[str, str]]:
    """(prompt, negative prompt) pairs from arguments, a file (one per line), or stdin for '-'; blank
    lines are skipped. A line of a file or of stdin may carry its own negative prompt
    ('PROMPT --negative TEXT'); other prompts get `negative` (--negative). Text that is not UTF-8 is
    one line naming the file (or stdin), line and column."""
    from ctxdiff.data.images import read_text, split_negative

    pairs: list[tuple[str, str]] = []
    lines = [] if from_file is None else read_text(from_file, "prompts file").splitlines()
    for prompt in prompts:
        if prompt == "-":
            pairs += [split_negative(line, negative) for line in read_stdin().splitlines() if line.strip()]
        elif prompt.strip():
            pairs.append((prompt.strip(), negative))
    pairs += [split_negative(line, negative) for line in lines if line.strip()]
    pairs = [(p, n) for p, n in pairs if p]
    if not pairs:
        raise UsageError("no prompts: pass them as arguments, with --from-file FILE, or '-' to read stdin")
    return pairs


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
    class_: list[str] = typer.Option(None, "--class", metavar="LABEL", help="Class-conditional models: the label to draw instead of a prompt, e.g. 'red triangle'; repeat for more."),
    layout: list[str] = typer.Option(None, "--layout", metavar="LAYOUT", help="Layout-conditional models: a JSON file of {\"label\": ..., \"box\": [x0, y0, x1, y1]} objects or inline 'red circle@0.1,0.1,0.4,0.4;blue square@...' (boxes in [0, 1]); repeat for more."),
    model: Path = typer.Option(None, "--model", "-m", help="A t2i bundle from `ctxdiff train`, or an SD 1.x/2.x checkpoint or diffusers folder (default: the bundled model)."),
    adapter: Path = typer.Option(None, "--adapter", help="A latent adapter (`ctxdiff train`, `latent:` recipe) for the SD checkpoint of --model."),
    height: int = typer.Option(None, "--height", min=8, max=8192, callback=_multiple_of_8, help="SD checkpoints: image height in pixels (default: 512 for SD 1.x)."),
    width: int = typer.Option(None, "--width", min=8, max=8192, callback=_multiple_of_8, help="SD checkpoints: image width in pixels (default: 512 for SD 1.x)."),
    vae_tiling: bool = typer.Option(False, "--vae-tiling", help="SD checkpoints: decode in 512-pixel tiles (less memory)."),
    num: int = typer.Option(1, "--num", "-n", min=1, max=100_000, help="Images per prompt."),
    seed: int = typer.Option(None, "--seed", callback=check_seed, help="Seed of the first image, 0 .. 2**64-1 (random when omitted; always recorded)."),
    steps: int = typer.Option(None, "--steps", min=1, help="Sampling steps of the base stage (default: the model's)."),
    sr_steps: int = typer.Option(None, "--sr-steps", min=1, help="Sampling steps of the super-resolution stage."),
    sampler: str = typer.Option(None, "--sampler", callback=check_sampler, metavar="NAME", help="ddim (Eq. 9/11), ddpm (Eq. 7), or a context-aware solver: dpmpp-2m, dpmpp-2m-sde, euler, euler-a, heun, unipc (or NAME-karras) (default: the model's)."),
    karras: bool = typer.Option(False, "--karras", help="Karras et al. sigmas (rho 7) for a solver: appends -karras to --sampler (not for ddim or ddpm)."),
    eta: float = typer.Option(None, "--eta", min=0.0, callback=check_finite, help="ddim only: stochasticity (0: deterministic, Eq. 11; 1: DDPM-like, Eq. 9)."),
    guidance: float = typer.Option(None, "--guidance", "-g", min=0.0, callback=check_finite, help="Classifier-free guidance weight."),
    no_adapter: bool = typer.Option(False, "--no-adapter", help="Sample with r = 0 (plain diffusion), same code path."),
    negative: str = typer.Option(None, "--negative", help="Negative prompt: guidance away from it (the adapter keeps the prompt's context); a prompts-file line may carry its own ('PROMPT --negative TEXT')."),
    init_image: Path = typer.Option(None, "--init-image", help="img2img: start from this image (resized to the model's size, with a note)."),
    strength: float = typer.Option(None, "--strength", callback=check_strength, help=f"img2img: how much of --init-image is repainted, in (0, 1]: sampling starts at step S*T (default {DEFAULT_STRENGTH}; 1: from noise)."),
    mask: Path = typer.Option(None, "--mask", help="Inpainting: a mask of --init-image's size; white is repainted, black kept."),
    lora: list[str] = typer.Option(None, "--lora", metavar="FILE[:WEIGHT]", help="SD checkpoints: merge a LoRA (kohya/A1111 or diffusers/PEFT layout) with this weight (default 1); repeat for more."),
    out: Path = typer.Option(Path("outputs"), "--out", "-o", help="Output folder."),
    grid_: bool = typer.Option(False, "--grid", help="Also write grid.png of all images."),
    batch_size: int = typer.Option(16, "--batch-size", min=1, help="Images sampled at once."),
    force: bool = typer.Option(False, "--force", help="Write into a folder that already holds files."),
) -> None:
    """Generate images from text prompts, or from class labels or layouts (PNG text chunks carry prompt
    or condition, seed and parameters)."""
    from ctxdiff import distributed
    from ctxdiff.data.layouts import describe
    from ctxdiff.data.png import grid, save_png, to_uint8
    from ctxdiff.pipelines.batch_generate import progress_steps

    conditions = read_conditions(class_ or [], layout or [], prompts or [], from_file, negative)
    pairs = [(c, "") for c in conditions] if conditions else read_prompts(prompts or [], from_file, negative or "")
    texts = [condition_text(p) for p, _ in pairs]
    _check_init_flags(init_image, strength, mask)
    if sampler is not None:
        _sampler_name(sampler, karras, given=True)          # --karras with ddim/ddpm: before any work
    check_output(out, "folder", force=force, empty=True)
    model_path = model or default_model()
    loras = lora_specs(lora)
    device = distributed.join(pick_device())
    main_rank = distributed.is_main()
    try:
        pipe = _pipeline(model_path, adapter, height, width, vae_tiling, loras, device)
        kind = check_condition_kind(pipe, model_path, conditions)
        d = pipe.defaults
        has_adapter = _has_adapter(pipe)
        # params.adapter records what runs (and is written to the JSON line and PNG): an adapter is used
        # only when the model has one and --no-adapter is not given; without one, r = 0 either way.
        params = replace(d, sampler=_sampler_name(sampler or d.sampler, karras, sampler is not None), steps=steps or d.steps,
                         sr_steps=sr_steps or d.sr_steps, eta=d.eta if eta is None else eta,
                         guidance=d.guidance if guidance is None else guidance, adapter=has_adapter and not no_adapter)
        check_steps(params.steps, pipe.sched.T, "--steps")
        check_steps(params.sr_steps, pipe.sched.T, "--sr-steps")
        init, init_notes, extra = _init_image(pipe, init_image, strength, mask, params.sampler)
        lora_meta = [{"file": str(path), "weight": weight} for path, weight in loras]
        if lora_meta:
            extra["loras"] = lora_meta
        notes = vocabulary_warnings(model_path, texts) if kind == "text" and not _is_sd(pipe) else {}
        if main_rank:
            if no_adapter and not has_adapter:
                warn("this model has no adapter; --no-adapter changes nothing")
            if eta is not None and params.sampler != "ddim":
                warn(f"--eta applies to ddim only; {params.sampler} does not use it")
            for line in [*init_notes, *notes.values()]:
                warn(line)
            for merged in getattr(pipe, "loras", []):
                info(f"LoRA {merged.describe()}")
        first_seed = distributed.from_main(seed if seed is not None else random.SystemRandom().randrange(2**31))
        jobs = [(i * num + j, p, n, image_seed(first_seed, i * num + j))
                for i, (p, n) in enumerate(pairs) for j in range(num)]
        batches = distributed.share([jobs[k:k + batch_size] for k in range(0, len(jobs), batch_size)])
        distributed.barrier()      # every rank has checked --out before any rank writes there
        out.mkdir(parents=True, exist_ok=True)
        records: list[list[dict]] = []      # per batch of this rank
        per_batch = progress_steps(pipe, params, None if init is None else init.strength)
        bar_context = progress_bar("generate", per_batch * len(batches)) if main_rank else nullcontext(None)
        with bar_context as bar:
            for batch in batches:
                negatives = [n for _, _, n, _ in batch]
                images = to_uint8(pipe.sample([p for _, p, _, _ in batch], [s for *_, s in batch], params, progress=bar,
                                              negative=negatives if any(negatives) else None, init=init))
                made = []
                for (index, condition, negative_prompt, image_seed_), image in zip(batch, images):
                    prompt = condition_text(condition)
                    meta = {"prompt": prompt, **({"negative": negative_prompt} if negative_prompt else {}),
                            **({} if kind == "text" else {"condition": {"kind": kind, "value": describe(condition)}}),
                            "seed": image_seed_, **asdict(params), "model": str(model_path),
                            **({"adapter_file": str(adapter)} if adapter else {}), **extra,
                            "size": f"{image.shape[1]}x{image.shape[0]}"}
                    stem = safe_stem(prompt if isinstance(condition, str) else " ".join(o.label for o in condition))
                    path = save_png(out / f"{index:05d}-{stem}-{image_seed_}.png", image, meta)
                    record = {"path": str(path), **meta, "warnings": [notes[prompt]] if prompt in notes else []}
                    emit_json(record)
                    made.append(record)
                records.append(made)
        records = [r for batch in distributed.merge_in_job_order(distributed.gather(records)) for r in batch]
        if not main_rank:
            return
        if grid_:
            import numpy as np

            from ctxdiff.data.images import read_image

            save_png(out / "grid.png", grid(np.stack([read_image(r["path"]) for r in records]),
                                            columns=num if num > 1 else None),
                     {"prompts": texts, "first_seed": first_seed, **asdict(params)})
        if not options().json:
            print_table(f"{len(records)} image(s) in {out}", ["file", "prompt", "seed"],
                        [[Path(r["path"]).name, r["prompt"], r["seed"]] for r in records])
        info(f"seed {first_seed}" + (" (random)" if seed is None else ""))
    finally:
        distributed.leave()


def read_conditions(labels: list[str], layouts: list[str], prompts: list[str], from_file: Path | None,
                    negative: str | None) -> list:
    """The labels of --class or the layouts of --layout (files or inline), in order; [] when neither
    is given (the prompts are text). Either replaces the prompts, and neither takes --negative:
    guidance is against the dropped condition."""
    if not labels and not layouts:
        return []
    from ctxdiff.data.layouts import layout_argument

    given = [flag for flag, value in (("--class", labels), ("--layout", layouts), ("prompts", prompts),
                                      ("--from-file", from_file)) if value]
    if len(given) > 1:
        raise UsageError(f"{' and '.join(given)}: a model takes one kind of condition; pass only one of them")
    if negative:
        raise UsageError(f"--negative: negative prompts are for text models; {given[0]} models guide against "
                         "the dropped condition")
    if labels:
        empty = [label for label in labels if not label.strip()]
        if empty:
            raise UsageError("--class: a label is a non-empty text such as 'red triangle'")
        return [" ".join(label.split()) for label in labels]
    return [layout_argument(value) for value in layouts]


def condition_text(condition) -> str:
    """A prompt, a class label, or a layout's inline form: what the table, file name and PNG 'prompt' show."""
    from ctxdiff.data.layouts import format_layout

    return condition if isinstance(condition, str) else format_layout(condition)


def check_condition_kind(pipe, model: Path, conditions: list) -> str:
    """The model's condition kind ("text", "class" or "layout"), checked against what was given;
    every label is checked against the model's (a close match named) before any work."""
    kind = getattr(pipe, "condition_kind", "text")
    given = "" if not conditions else "class" if isinstance(conditions[0], str) else "layout"
    flags = {"class": "--class LABEL", "layout": "--layout FILE|INLINE", "text": "prompts"}
    if kind != (given or "text"):
        known = f" (labels: {', '.join(map(repr, pipe.labels[:8]))}{', ...' if len(pipe.labels) > 8 else ''})" \
            if kind != "text" else ""
        raise UsageError(f"{model} is a {kind}-conditional model: pass {flags[kind]}{known}, "
                         f"not {flags[given or 'text']}")
    if conditions:
        pipe.encode(list({condition_text(c): c for c in conditions}.values()))
    return kind


def _check_init_flags(init_image: Path | None, strength: float | None, mask: Path | None) -> None:
    given = [flag for flag, value in (("--strength", strength), ("--mask", mask)) if value is not None]
    if init_image is None and given:
        raise UsageError(f"{', '.join(given)}: only with --init-image PATH (img2img and inpainting start from an image)")


def _sampler_name(name: str, karras: bool, given: bool) -> str:
    """--sampler with --karras: NAME-karras for a solver; ddim and ddpm have no sigmas to place."""
    if not karras:
        return name
    base = name.removesuffix("-karras")
    if base in ("ddim", "ddpm"):
        default = "" if given else " (the model's default sampler)"
        raise UsageError(f"--karras: Karras sigmas are for the solvers ({', '.join(SOLVERS)}), not {base}{default}; "
                         "pass --sampler with one of them")
    return f"{base}-karras"


def _init_image(pipe, path: Path | None, strength: float | None, mask: Path | None, sampler: str):
    """(InitImage or None, notes to print, what the PNG and JSON line record) of --init-image/--strength/--mask,
    at the model's size."""
    if path is None:
        return None, [], {}
    from ctxdiff.pipelines.init_image import read_init_image, start_step

    strength = DEFAULT_STRENGTH if strength is None else strength
    if sampler.endswith("-karras") and start_step(pipe.sched.T, strength) < pipe.sched.T:
        raise UsageError(f"--sampler {sampler} places its Karras sigmas over the whole range, so it cannot start "
                         f"an init image at --strength {strength:g}; use {sampler.removesuffix('-karras')} or "
                         "--strength 1")
    size = pipe.size if _is_sd(pipe) else (pipe.image_size, pipe.image_size)
    image, notes = read_init_image(path, size, strength, mask)
    record = {"init_image": str(path), "strength": strength, **({"mask": str(mask)} if mask is not None else {})}
    return image, notes, record


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


def _pipeline(model: Path, adapter: Path | None, height: int | None, width: int | None, vae_tiling: bool,
              loras: list[tuple[Path, float]], device):
    """A t2i bundle's cascade, or a Stable Diffusion checkpoint (with its latent adapter and LoRAs) in latent space."""
    from ctxdiff.pipelines.latent import LatentText2Image
    from ctxdiff.formats.latent_adapter import is_sd_model
    from ctxdiff.pipelines.text2image import Text2Image

    if not model.exists():
        raise CtxdiffError(f"{model}: no such model file or folder; pass --model (a t2i bundle from `ctxdiff train`, "
                           "or a Stable Diffusion checkpoint or diffusers folder)")
    if is_sd_model(model):
        with model_files(model, adapter):
            return LatentText2Image.from_checkpoint(model, adapter, device=device, height=height, width=width,
                                                    vae_tiling=vae_tiling, loras=loras)
    given = [flag for flag, value in (("--adapter", adapter), ("--height", height), ("--width", width),
                                      ("--vae-tiling", vae_tiling), ("--lora", loras)) if value]
    if given:
        raise UsageError(f"{', '.join(given)}: only for Stable Diffusion checkpoints; {model} is a ctxdiff t2i bundle "
                         "(it carries its own adapter and size)")
    with model_files(model):
        return Text2Image.from_bundle(model, device)
