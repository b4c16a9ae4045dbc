"""`ctxdiff train --recipe R.yaml [--set a.b=v ...] [--resume] [--print-recipe]`."""

from __future__ import annotations

import json
from pathlib import Path

import typer

from ctxdiff.cli.app import app, options
from ctxdiff.cli.common import check_output, check_run_start, graceful_interrupt, pick_device
from ctxdiff.cli.output import emit_json, info, print_table, progress_bar


@app.command()
def train(
    recipe: Path = typer.Option(..., "--recipe", "-r", help="YAML recipe (see recipes/)."),
    set_: list[str] = typer.Option(None, "--set", help="Override a recipe key: --set train.lr=1e-4 (repeatable)."),
    resume: bool = typer.Option(False, "--resume", help="Continue the run in the recipe's output folder exactly."),
    print_recipe: bool = typer.Option(False, "--print-recipe", help="Print the resolved recipe (YAML) and exit."),
    force: bool = typer.Option(False, "--force", help="Start the run over: remove the files a run writes in the "
                                                      "output folder first (never the folder's other files)."),
) -> None:
    """Train a ContextDiff model (base or super-resolution stage), an adapter over a Stable Diffusion
    checkpoint (a recipe with `latent:`), or the small CLIP, from a recipe."""
    from ctxdiff.recipes import dump_recipe
    from ctxdiff.training.clip import ClipTrainer
    from ctxdiff.training.recipe import read_recipe

    resolved = read_recipe(recipe, set_ or [])
    if print_recipe:
        typer.echo(dump_recipe(resolved), nl=False)
        return
    device = pick_device()
    out = Path(resolved.output)
    check_output(out, "folder", flag="output")
    check_run_start(out, resume, force)
    if resolved.latent is not None:
        from ctxdiff.training.latent_adapter import LatentAdapterTrainer as Trainer
    elif resolved.train.stage == "clip":
        Trainer = ClipTrainer
    else:
        from ctxdiff.training.trainer import Trainer

    trainer = Trainer(resolved, device, resume=resume, log=info)
    what = "latent adapter" if resolved.latent is not None else resolved.train.stage
    with progress_bar(f"train {what}", resolved.train.steps, ("loss", "lr", "it_s")) as bar:
        bar.advance(trainer.step)

        def on_step(record: dict) -> None:
            bar.advance(loss=record["loss"], lr=record["lr"], it_s=record["it_per_s"])

        trainer.on_step = on_step
        with graceful_interrupt() as stop:
            result = trainer.run(should_stop=stop)
    summary = {"step": result.step, "loss": result.loss, "model": str(result.model_path),
               "checkpoints": str(trainer.ckpt_dir), "interrupted": result.interrupted}
    if result.interrupted:
        emit_json(summary)
        info(f"interrupted at step {result.step}; checkpoint saved. Continue with: "
             f"ctxdiff train --recipe {recipe} --resume")
        raise typer.Exit(130)
    scores = _clip_eval(resolved, trainer.trained()) if isinstance(trainer, ClipTrainer) else {}
    emit_json(summary | scores)
    if not options().json:
        print_table("training finished", ["step", "loss", "model"], [[result.step, result.loss, result.model_path]])
        if scores:
            print_table("held-out CLIP scores", ["metric", "value"], [[k, v] for k, v in scores.items()])


def _clip_eval(recipe, encoders) -> dict:
    """Held-out scores of a trained shapes CLIP, also written to <output>/clip-eval.json."""
    from ctxdiff.shapes.world import ShapesWorld
    from ctxdiff.training.clip import shapes_scores

    if recipe.data.source != "shapes":
        return {}
    result = shapes_scores(encoders, ShapesWorld(seed=recipe.data.shapes_seed + 1, image_size=recipe.data.image_size))
    (Path(recipe.output) / "clip-eval.json").write_text(json.dumps(result, indent=2))
    return result
