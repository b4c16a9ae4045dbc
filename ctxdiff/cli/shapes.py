"""`ctxdiff shapes`: write a sample of the synthetic shapes world to a folder."""

from __future__ import annotations

from pathlib import Path

import typer

from ctxdiff.cli.app import app
from ctxdiff.cli.common import check_output, check_seed
from ctxdiff.cli.output import emit_json, info, progress_bar


@app.command("shapes")
def shapes(
    out_dir: Path = typer.Argument(..., help="Folder to write into (new or empty, unless --force)."),
    n: int = typer.Option(100, "--n", min=1, help="How many samples."),
    seed: int = typer.Option(0, "--seed", callback=check_seed,
                             help="World seed, 0 .. 2**64-1: the same seed writes the same samples."),
    size: int = typer.Option(64, "--size", min=8, max=2048, help="Image side in pixels."),
    videos: bool = typer.Option(False, "--videos", help="Write videos of a moving shape instead of images."),
    frames: int = typer.Option(8, "--frames", min=2, max=1000, help="Frames per video (with --videos)."),
    force: bool = typer.Option(False, "--force", help="Write into a folder that is not empty (same names are overwritten)."),
) -> None:
    """Write captioned samples of the shapes world: NNNNN.png + NNNNN.txt pairs, or with --videos
    frame folders NNNNN/ + NNNNN.txt (+ NNNNN.json: fps, caption, per-frame centres)."""
    from ctxdiff.shapes.datasets import prepare_folder, write_samples

    kind = "videos" if videos else "images"
    check_output(out_dir, "folder", force=force, empty=True, flag="OUT_DIR")
    prepare_folder(out_dir, force)
    with progress_bar(f"writing {kind}", total=n) as bar:
        def written(index: int, path: Path, caption: str) -> None:
            emit_json({"index": index, "path": str(path), "caption": caption})
            bar.advance()

        write_samples(out_dir, n, seed=seed, size=size, kind=kind, frames=frames, force=force, callback=written)
    info(f"wrote {n} {kind} with captions to {out_dir}")
