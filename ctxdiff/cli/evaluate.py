"""`ctxdiff evaluate`: FID / KID, CLIP score, video text alignment and temporal consistency, an
edited video's fidelity to its source (PSNR, SSIM, warp error), the shapes judge.

Each metric is one function in METRICS: it takes the EvalRequest (every flag given) and returns
a MetricResult (the JSON record and the table for people). A new metric is one more entry.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, Callable

import typer

import ctxdiff
from ctxdiff.cli.app import app
from ctxdiff.cli.common import SEED_LIMIT, check_finite, check_output, check_seed, check_steps, model_files, pick_device
from ctxdiff.cli.output import emit_json, info, print_table, progress_bar
from ctxdiff.errors import CtxdiffError, UsageError

DEFAULT_CLIP = Path(ctxdiff.__file__).parent / "assets" / "shapes-default.safetensors"  # its CLIP
FIDELITY_COLUMNS = {"psnr": "PSNR dB vs source", "ssim": "SSIM vs source", "warp_error": "warp error"}
VIDEO_COLUMNS = {"text_alignment": "text alignment", "temporal_consistency_all_pairs": "consistency (all pairs)",
                 "temporal_consistency_consecutive": "consistency (consecutive)"}


@dataclass
class EvalRequest:
    """Everything `evaluate` was given; a metric takes what it needs through `need`."""

    metric: str
    real: Path | None = None
    fake: Path | None = None
    save_stats: Path | None = None
    features: str = "inception"
    images: Path | None = None
    videos: list[Path] = field(default_factory=list)
    prompts: Path | None = None
    prompt: str | None = None
    clip_arch: str = "ViT-B-32"
    clip_weights: str | None = None
    batch_size: int = 32
    device: str = "cpu"
    model: Path | None = None
    num: int | None = None
    seed: int = 0
    guidance: float | None = None
    steps: int | None = None
    adapter: bool = True
    data: str | None = None
    bpd_timesteps: int | None = None
    layouts: Path | None = None
    sources: list[Path] = field(default_factory=list)
    flow: str = "dis"

    def need(self, name: str, flag: str) -> Any:
        value = getattr(self, name)
        if value is None or value == []:
            raise UsageError(f"--metric {self.metric} needs {flag}")
        return value


@dataclass
class MetricResult:
    """`record`: the JSON object (stdout with --json, --out); `columns`/`rows`: the table on stderr."""

    record: dict
    columns: list[str]
    rows: list[tuple]


def summary(record: dict) -> MetricResult:
    """A two-column table of the record's scalar entries."""
    rows = [(key, value) for key, value in record.items() if isinstance(value, (str, int, float))]
    return MetricResult(record, ["quantity", "value"], rows)


# -- the metrics ---------------------------------------------------------------------------------

def _feature_stats(req: EvalRequest):
    """(extractor, real stats, fake stats or None) for FID/KID; --save-stats writes the real stats."""
    from ctxdiff.data.images import list_images
    from ctxdiff.metrics.fid import dataset_stats

    req.need("real", "--real DIR|STATS.npz")
    if req.model is not None:
        _generate_fakes(req)
    if req.fake is None and req.save_stats is None:
        raise UsageError(f"--metric {req.metric} needs --fake DIR (or only --save-stats PATH, to save "
                         "the statistics of --real)")
    if req.fake is not None:
        list_images(req.fake, recursive=True)  # an empty --fake fails before the long extraction
    extractor, real_stats = _reference_stats(req)
    if req.fake is None:
        return extractor, real_stats, None
    info(f"{req.metric}: {extractor.name} features of {req.fake}")
    return extractor, real_stats, dataset_stats(req.fake, extractor, req.batch_size, req.device)


def _reference_stats(req: EvalRequest):
    """(extractor, statistics of --real); --save-stats writes them."""
    from ctxdiff.metrics.fid import dataset_stats, feature_extractor, save_stats

    real = req.need("real", "--real DIR|STATS.npz")
    extractor = feature_extractor(req.features, req.device)
    info(f"{req.metric}: {extractor.name} features of {real}")
    real_stats = dataset_stats(real, extractor, req.batch_size, req.device)
    if req.save_stats is not None:
        save_stats(req.save_stats, real_stats)
        info(f"saved the statistics of {real} to {req.save_stats}")
    return extractor, real_stats


def _distance_record(req: EvalRequest, extractor, real_stats, fake_stats, value: float | None) -> dict:
    record = {"metric": req.metric, "features": extractor.name, "real": str(req.real),
              "real_images": real_stats.count}
    if req.save_stats is not None:
        record["saved_stats"] = str(req.save_stats)
    if fake_stats is not None:
        record.update({"fake": str(req.fake), "fake_images": fake_stats.count, req.metric: value})
    return record


def fid_metric(req: EvalRequest) -> MetricResult:
    from ctxdiff.metrics.fid import fid_between

    extractor, real, fake = _feature_stats(req)
    value = None if fake is None else fid_between(real, fake)
    return summary(_distance_record(req, extractor, real, fake, value))


def kid_metric(req: EvalRequest) -> MetricResult:
    from ctxdiff.metrics.fid import kid_between

    extractor, real, fake = _feature_stats(req)
    value = None if fake is None else kid_between(real, fake)
    return summary(_distance_record(req, extractor, real, fake, value))


def _pipeline(req: EvalRequest):
    """The --model bundle; --steps and --bpd-timesteps are checked against its T before any work."""
    from ctxdiff.pipelines.text2image import Text2Image

    with model_files(req.model):
        pipe = Text2Image.from_bundle(req.model, req.device)
    check_steps(req.steps, pipe.sched.T)
    check_steps(req.bpd_timesteps, pipe.sched.T, "--bpd-timesteps")
    return pipe


def _sampling_params(req: EvalRequest, pipe):
    from dataclasses import replace

    d = pipe.defaults
    return replace(d, guidance=d.guidance if req.guidance is None else req.guidance, steps=req.steps or d.steps,
                   adapter=req.adapter)


def _generate_fakes(req: EvalRequest) -> None:
    """The zero-shot protocol: -n captions sampled from --prompts, generated into --fake (resumable)."""
    from ctxdiff.data.images import read_prompt_lines
    from ctxdiff.pipelines.batch_generate import generate_to_folder, sample_captions

    fake = req.need("fake", "--fake DIR (where the generated images go)")
    captions = sample_captions(read_prompt_lines(req.need("prompts", "--prompts FILE (captions to sample)")),
                               req.need("num", "-n N (images to generate)"), req.seed)
    pipe = _pipeline(req)
    from contextlib import nullcontext

    from ctxdiff import distributed

    # under torchrun the batches are dealt out to the ranks (ctxdiff/distributed.py); rank 0 shows its share
    mine = sum(len(b) for b in distributed.share([captions[i:i + req.batch_size]
                                                  for i in range(0, len(captions), req.batch_size)]))
    bar_context = (progress_bar(f"generate {len(captions)} for {req.metric}", mine) if distributed.is_main()
                   else nullcontext(None))
    with bar_context as bar:
        generate_to_folder(pipe, captions, fake, req.seed, _sampling_params(req, pipe), req.batch_size, bar)


def bpd_metric(req: EvalRequest) -> MetricResult:
    """The variational bound (Eq. 4, Appendix A.2) in bits/dim of the base stage on held-out images."""
    from dataclasses import asdict

    from ctxdiff.data.datasets import open_dataset
    from ctxdiff.evaluation import bits_per_dim

    req.need("model", "--model BUNDLE")
    pipe = _pipeline(req)
    size = pipe.base.unet.config.image_size
    data = open_dataset(req.need("data", "--data DIR|shapes"), size, shapes_count=req.num or 256, shapes_seed=4242)
    count = min(len(data), req.num or len(data))
    with progress_bar("bits/dim", count) as bar:
        bound = bits_per_dim(pipe, data, count=count, batch_size=req.batch_size, seed=req.seed, adapter=req.adapter,
                             num_timesteps=req.bpd_timesteps, progress=bar)
    parts = asdict(bound)
    record = {"metric": "bpd", "model": str(req.model), "data": req.data, "images": parts.pop("images"),
              "adapter": req.adapter, **parts, "timesteps": "all" if req.bpd_timesteps is None else req.bpd_timesteps}
    return summary(record)


def _load_clip(req: EvalRequest):
    from ctxdiff.models.encoders import ClipConfig, load_clip

    weights = req.clip_weights
    if weights is None:
        if not DEFAULT_CLIP.is_file():
            raise UsageError(f"no CLIP to score with: the bundled shapes CLIP ({DEFAULT_CLIP}) is not installed; "
                             "pass --clip-weights FILE (an open_clip state dict or a ctxdiff clip bundle) "
                             "and --clip-arch NAME")
        weights = str(DEFAULT_CLIP)
    return load_clip(ClipConfig(arch=req.clip_arch, weights=weights), req.device)


def _clip_name(encoders) -> str:
    return f"{encoders.config.arch} ({encoders.config.weights})"


def _images_and_prompts(req: EvalRequest):
    from ctxdiff.data.images import ImageFiles, list_images, prompts_for_images

    paths = list_images(req.need("images", "--images DIR"))
    return ImageFiles(paths), prompts_for_images(paths, req.prompts)


def clip_score_metric(req: EvalRequest) -> MetricResult:
    from ctxdiff.metrics.clip_score import clip_scores

    images, prompts = _images_and_prompts(req)
    encoders = _load_clip(req)
    info(f"clip-score: {len(images)} images of {req.images} with CLIP {_clip_name(encoders)}")
    scores = clip_scores(encoders, images, prompts, req.batch_size)
    record = {"metric": req.metric, "images": str(req.images), "clip": _clip_name(encoders), **scores,
              "files": [p.name for p in images.paths], "prompts": prompts}
    return summary(record)


def _video_prompts(req: EvalRequest, required: bool) -> list[str | None]:
    """--prompt for every video, else line i of --prompts for video i, else each video's sidecar."""
    from ctxdiff.data.images import read_prompt_lines
    from ctxdiff.data.video import video_prompt

    videos = req.videos
    if req.prompt is not None:
        return [req.prompt] * len(videos)
    if req.prompts is not None:
        prompts = read_prompt_lines(req.prompts)
        if len(prompts) != len(videos):
            raise CtxdiffError(f"{req.prompts}: {len(prompts)} prompts for {len(videos)} videos; "
                               "give one prompt a line for each --videos, in order")
        return prompts
    prompts = [video_prompt(v) for v in videos]
    missing = [v for v, p in zip(videos, prompts) if p is None]
    if required and missing:
        raise UsageError(f"--metric {req.metric}: no prompt for {missing[0]}; pass --prompt TEXT, "
                         "--prompts FILE (one line a video) or a sidecar <video>.json with a \"prompt\"")
    return prompts


def _video_metric(req: EvalRequest, prompt_required: bool) -> MetricResult:
    from ctxdiff.data.video import read_video
    from ctxdiff.metrics.video import mean_over_videos, video_scores

    videos = req.need("videos", "--videos PATH (a video file or a folder of frames; repeat the flag)")
    prompts = _video_prompts(req, prompt_required)
    encoders = _load_clip(req)
    size = encoders.image_size  # frames are cropped to the CLIP's input as they are read
    clips = [read_video(v, size=size) for v in videos]
    info(f"{req.metric}: {len(clips)} videos with CLIP {_clip_name(encoders)}")
    per_video = [{"video": str(v), "prompt": p, **video_scores(encoders, clip.frames, p, req.batch_size)}
                 for v, p, clip in zip(videos, prompts, clips)]
    means = mean_over_videos(per_video)
    record = {"metric": req.metric, "clip": _clip_name(encoders), "videos": per_video,
              **{f"mean_{k}": v for k, v in means.items()}}
    rows = [(Path(r["video"]).name, r["frames"], *(r[k] for k in means)) for r in per_video]
    rows.append(("mean", sum(r["frames"] for r in per_video), *means.values()))
    return MetricResult(record, ["video", "frames", *(VIDEO_COLUMNS[k] for k in means)], rows)


def text_alignment_metric(req: EvalRequest) -> MetricResult:
    return _video_metric(req, prompt_required=True)


def temporal_consistency_metric(req: EvalRequest) -> MetricResult:
    return _video_metric(req, prompt_required=False)


def _source_of(video: Path, given: Path | None) -> tuple[Path, dict]:
    """(source video, its frame selection) of an edited video: --source, else what `ctxdiff edit`
    recorded in the video's sidecar."""
    from ctxdiff.data.video import read_sidecar

    record = read_sidecar(video)
    selection = record["clip"] if isinstance(record.get("clip"), dict) else {}
    source = given or (Path(record["source"]) if record.get("source") else None)
    if source is None:
        raise UsageError(f"--metric fidelity: no source for {video} (its sidecar records none); pass --source PATH")
    return source, selection if given is None else {}


def fidelity_metric(req: EvalRequest, keys: tuple[str, ...] = ("psnr", "ssim", "warp_error")) -> MetricResult:
    """PSNR and SSIM of each edited video against its source and the warp error by the source's flow
    (ctxdiff/metrics/fidelity.py), frame for frame at the edited video's size."""
    import numpy as np

    from ctxdiff.data.video import read_video
    from ctxdiff.metrics.fidelity import FLOWS, fidelity_scores

    videos = req.need("videos", "--videos PATH (an edited video or folder of frames; repeat the flag)")
    if req.flow not in FLOWS:
        raise UsageError(f"--flow {req.flow!r}: use one of {', '.join(FLOWS)}")
    if len(req.sources) not in (0, 1, len(videos)):
        raise UsageError(f"{len(req.sources)} --source for {len(videos)} --videos: give one source for all, "
                         "or one per video in order")
    sources = req.sources * len(videos) if len(req.sources) == 1 else req.sources or [None] * len(videos)
    per_video = []
    for video, given in zip(videos, sources):
        source, selection = _source_of(video, given)
        edited = read_video(video).frames
        original = read_video(source, num_frames=len(edited), start=selection.get("start", 0),
                              stride=selection.get("stride", 1)).frames
        if original.shape != edited.shape:
            raise CtxdiffError(f"{video} ({len(edited)} frames, {edited.shape[2]}x{edited.shape[1]}) and its source "
                               f"{source} ({len(original)} frames, {original.shape[2]}x{original.shape[1]}) differ; "
                               "compare an edit written at the source's size (not --side-by-side)")
        scores = fidelity_scores(edited, original, flow=req.flow)
        per_video.append({"video": str(video), "source": str(source), "frames": len(edited),
                          **{k: scores[k] for k in keys if k in scores}})
    shown = [k for k in keys if any(k in r for r in per_video)]
    means = {f"mean_{k}": float(np.mean([r[k] for r in per_video if k in r])) for k in shown}
    record = {"metric": req.metric, "flow": req.flow, "videos": per_video, **means}
    rows = [(Path(r["video"]).name, r["frames"], *(r.get(k, "") for k in shown)) for r in per_video]
    rows.append(("mean", sum(r["frames"] for r in per_video), *means.values()))
    return MetricResult(record, ["video", "frames", *(FIDELITY_COLUMNS[k] for k in shown)], rows)


def shapes_metric(req: EvalRequest) -> MetricResult:
    """The shapes judge: of prompts (per attribute, single and two objects), or of the class labels
    and layouts the images were made for (--layouts, or the images' metadata)."""
    from ctxdiff.data.images import ImageFiles, list_images
    from ctxdiff.data.layouts import conditions_for_images
    from ctxdiff.shapes.judge import REPORT_COLUMNS, condition_accuracy, judge_many

    paths = list_images(req.need("images", "--images DIR"))
    conditions = conditions_for_images(paths, req.layouts)
    if conditions is not None:
        kind = "class" if isinstance(conditions[0], str) else "layout"
        info(f"shapes: judging {len(paths)} images of {req.images} against their {kind} conditions")
        try:
            accuracy = condition_accuracy(ImageFiles(paths), conditions)
        except ValueError as e:      # a label outside the shapes world
            raise UsageError(f"--metric shapes: {e}") from None
        return summary({"metric": req.metric, "images": str(req.images), "condition": kind, **accuracy})
    images, prompts = _images_and_prompts(req)
    info(f"shapes: judging {len(images)} images of {req.images}")
    report = judge_many(images, prompts)
    record = {"metric": req.metric, "images": str(req.images), **report.to_dict()}
    return MetricResult(record, ["group", *REPORT_COLUMNS[1:]], report.rows())


METRICS: dict[str, Callable[[EvalRequest], MetricResult]] = {
    "fid": fid_metric,
    "kid": kid_metric,
    "clip-score": clip_score_metric,
    "text-alignment": text_alignment_metric,
    "temporal-consistency": temporal_consistency_metric,
    "fidelity": fidelity_metric,
    "psnr": partial(fidelity_metric, keys=("psnr",)),
    "ssim": partial(fidelity_metric, keys=("ssim",)),
    "warp-error": partial(fidelity_metric, keys=("warp_error",)),
    "shapes": shapes_metric,
    "bpd": bpd_metric,
}


@app.command()
def evaluate(
    metric: str = typer.Option("fid", "--metric", help=f"One of: {', '.join(METRICS)}."),
    real: Path | None = typer.Option(None, "--real", help="FID/KID reference: a folder of images or a .npz of statistics."),
    fake: Path | None = typer.Option(None, "--fake", help="FID/KID: the folder of generated images."),
    save_stats: Path | None = typer.Option(None, "--save-stats", help="FID/KID: save the statistics of --real to this .npz."),
    features: str = typer.Option("inception", "--features", help="FID/KID features: inception | clip:<arch>:<weights file>."),
    images: Path | None = typer.Option(None, "--images", help="clip-score, shapes: the folder of images to score."),
    videos: list[Path] | None = typer.Option(None, "--videos", metavar="PATH", help="text-alignment, temporal-consistency, fidelity: a video file or folder of frames; repeat for more."),
    prompts: Path | None = typer.Option(None, "--prompts", help="One prompt a line, per image (sorted file names) or per --videos; default: PNG 'prompt' chunks or sidecars."),
    prompt: str | None = typer.Option(None, "--prompt", help="The prompt of every --videos."),
    clip_arch: str = typer.Option("ViT-B-32", "--clip-arch", help="open_clip architecture of --clip-weights (a ctxdiff clip bundle names its own)."),
    clip_weights: str | None = typer.Option(None, "--clip-weights", help="CLIP weights file; default: the bundled shapes CLIP."),
    batch_size: int = typer.Option(32, "--batch-size", min=1, help="Images per forward pass."),
    out: Path | None = typer.Option(None, "--out", help="Also write the result JSON to this file."),
    force: bool = typer.Option(False, "--force", help="Replace an existing --out or --save-stats file."),
    model: Path | None = typer.Option(None, "--model", help="fid/kid: generate --fake from --prompts first (zero-shot protocol); bpd: the model."),
    num: int | None = typer.Option(None, "--num", "-n", min=1, help="Images to generate (zero-shot) or to score (bpd)."),
    seed: int = typer.Option(0, "--seed", callback=check_seed,
                             help="Seed of the caption sample and of image i (seed + i), 0 .. 2**64-1."),
    guidance: float | None = typer.Option(None, "--guidance", min=0.0, callback=check_finite, help="Guidance weight for generation (default: the model's)."),
    steps: int | None = typer.Option(None, "--steps", min=1, help="Sampling steps for generation (default: the model's)."),
    no_adapter: bool = typer.Option(False, "--no-adapter", help="Generate / score with r = 0 (plain diffusion)."),
    data: str | None = typer.Option(None, "--data", help="bpd: held-out images (a folder with .txt captions, or 'shapes')."),
    bpd_timesteps: int | None = typer.Option(None, "--bpd-timesteps", min=1, help="bpd: estimate the sum over t from this many random steps (default: all T)."),
    sweep: str | None = typer.Option(None, "--sweep", help="guidance=1.5,3,4.5,...: generate and score per value (with --model), plus a plot."),
    source: list[Path] | None = typer.Option(None, "--source", metavar="PATH", help="fidelity, psnr, ssim, warp-error: the source video of --videos (one for all or one per video; default: what `edit` recorded in each video's sidecar)."),
    flow: str = typer.Option("dis", "--flow", help="warp error: the source's optical flow, dis or farneback (OpenCV)."),
    layouts: Path | None = typer.Option(None, "--layouts", help="shapes: a JSON list of layouts, one per image (sorted file names), to judge against (default: the class or layout in each PNG's metadata)."),
) -> None:
    """Score images or videos: FID/KID against reference images, CLIP score, video text alignment
    and temporal consistency, an edit's fidelity to its source (PSNR, SSIM, warp error), or the shapes judge."""
    if metric not in METRICS:
        raise UsageError(f"unknown metric '{metric}'; use one of: {', '.join(METRICS)}")
    _check_outputs(out, save_stats, fake if (model is not None or sweep) else None, force)
    if model is not None and num is not None and seed + num > SEED_LIMIT:
        raise UsageError(f"--seed {seed} with -n {num}: image i is made with seed + i, past 2**64-1; pass a smaller "
                         "--seed")
    from ctxdiff import distributed

    device = pick_device()
    zero_shot = model is not None and metric in ("fid", "kid") and not sweep
    if zero_shot:      # torchrun: the ranks split the images; rank 0 measures and prints
        device = distributed.join(device)
    request = EvalRequest(metric, real, fake, save_stats, features, images, list(videos or []), prompts,
                          prompt, clip_arch, clip_weights, batch_size, str(device),
                          model, num, seed, guidance, steps, not no_adapter, data, bpd_timesteps, layouts,
                          list(source or []), flow)
    try:
        if zero_shot and not distributed.is_main():
            request.need("real", "--real DIR|STATS.npz")
            _generate_fakes(request)
            return
        result = run_sweep(request, sweep) if sweep else METRICS[metric](request)
    finally:
        if zero_shot:
            distributed.leave()
    print_table(f"evaluate: {metric}", result.columns, result.rows)
    emit_json(result.record)
    if out is not None:
        from ctxdiff.data.video import write_json_atomic

        write_json_atomic(out, result.record)
        info(f"wrote {out}")


def _check_outputs(out: Path | None, save_stats: Path | None, fake: Path | None, force: bool) -> None:
    """--out and --save-stats are files, replaced only with --force; --fake, where generated images
    go, a folder that can be written (the protocol itself checks what is already in it)."""
    if out is not None:
        check_output(out, "file", force=force, flag="--out")
    if save_stats is not None:
        if save_stats.suffix != ".npz":
            raise UsageError(f"--save-stats {save_stats}: statistics files end in .npz")
        check_output(save_stats, "file", force=force, flag="--save-stats")
    if out is not None and save_stats is not None and out.absolute() == save_stats.absolute():
        raise UsageError(f"--out and --save-stats are the same file ({out}); pass two paths")
    if fake is not None:
        check_output(fake, "folder", flag="--fake")


def run_sweep(req: EvalRequest, sweep: str) -> MetricResult:
    """--sweep guidance=1.5,3,...: per value, generate into --fake/guidance-<v>/ and measure FID
    (against --real) and CLIP score; a table and a plot of CLIP score against FID (paper Fig. 11)."""
    from dataclasses import asdict

    from ctxdiff.data.images import read_prompt_lines
    from ctxdiff.evaluation import guidance_sweep, plot_sweep
    from ctxdiff.pipelines.batch_generate import sample_captions

    name, _, values = sweep.partition("=")
    if name != "guidance" or not values:
        raise UsageError(f"--sweep {sweep!r}: use --sweep guidance=1.5,3,4.5,6,7.5,9")
    try:
        weights = [float(v) for v in values.split(",")]
    except ValueError:
        raise UsageError(f"--sweep {sweep!r}: the values must be numbers") from None
    req.need("model", "--model BUNDLE")
    base = req.need("fake", "--fake DIR (the sweep writes DIR/guidance-<value>/)")
    req.need("real", "--real DIR|STATS.npz")
    captions = sample_captions(read_prompt_lines(req.need("prompts", "--prompts FILE (captions to sample)")),
                               req.need("num", "-n N (images to generate)"), req.seed)
    pipe = _pipeline(req)
    extractor, real_stats = _reference_stats(req)
    points = guidance_sweep(pipe, captions, weights, base, real=real_stats, extractor=extractor, clip=_load_clip(req),
                            params=_sampling_params(req, pipe), seed=req.seed, batch_size=req.batch_size,
                            device=req.device, progress=progress_bar, log=info)
    plot = plot_sweep(points, base / "sweep.png", req.features)
    return MetricResult({"metric": "sweep", "model": str(req.model), "features": req.features,
                         "points": [asdict(p) for p in points], "plot": str(plot)},
                        ["guidance", "FID", "CLIP score (mean cosine)"],
                        [(p.guidance, p.fid, p.clip_mean_cosine) for p in points])
