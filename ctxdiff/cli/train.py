"""`ctxdiff train --recipe R.yaml [--set a.b=v ...] [--resume] [--print-recipe]`."""

from __future__ import annotations

from pathlib import Path

import typer

from ctxdiff.cli.app import app, options
from ctxdiff.cli.common import graceful_interrupt, pick_device
from ctxdiff.cli.output import emit_json, info, print_table, progress_bar


@app.command()
def train(
    recipe: Path = typer.Option(..., "--recipe", "-r", help="YAML recipe (see recipes/)."),
    set_: list[str] = typer.Option(None, "--set", help="Override a recipe key: --set train.lr=1e-4 (repeatable)."),
    resume: bool = typer.Option(False, "--resume", help="Continue the run in the recipe's output folder exactly."),
    print_recipe: bool = typer.Option(False, "--print-recipe", help="Print the resolved recipe (YAML) and exit."),
) -> None:
    """Train a ContextDiff model (base or super-resolution stage), an adapter over a Stable Diffusion
    checkpoint (a recipe with `latent:`), or the small CLIP, from a recipe."""
    from ctxdiff.recipes import dump_recipe
    from ctxdiff.training.recipe import read_recipe

    resolved = read_recipe(recipe, set_ or [])
    if print_recipe:
        typer.echo(dump_recipe(resolved), nl=False)
        return
    device = pick_device()
    if resolved.train.stage == "clip" and resolved.latent is None:
        _train_clip(resolved, device)
        return
    if resolved.latent is not None:
        from ctxdiff.training.latent_adapter import LatentAdapterTrainer as Trainer
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
    emit_json(summary)
    if result.interrupted:
        info(f"interrupted at step {result.step}; checkpoint saved. Continue with: "
             f"ctxdiff train --recipe {recipe} --resume")
        raise typer.Exit(130)
    if not options().json:
        print_table("training finished", ["step", "loss", "model"], [[result.step, result.loss, result.model_path]])


def _train_clip(recipe, device) -> None:
    """Contrastive CLIP training (train.stage: clip); writes <output>/clip.safetensors."""
    from ctxdiff.data.datasets import open_dataset
    from ctxdiff.data.shapes import ShapesDataset, ShapesWorld
    from ctxdiff.models.encoders import save_clip
    from ctxdiff.training.clip import retrieval_top1, train_clip

    import torch

    size = recipe.data.image_size
    data = open_dataset(recipe.data.source, size, caption_key=recipe.data.caption_key,
                        shapes_count=recipe.data.shapes_count, shapes_seed=recipe.data.shapes_seed)
    out = Path(recipe.output)
    out.mkdir(parents=True, exist_ok=True)
    cfg = recipe.train
    with progress_bar("train clip", cfg.steps, ("loss",)) as bar:
        encoders = train_clip(recipe.model.clip, data, steps=cfg.steps, batch_size=cfg.batch_size, lr=cfg.lr,
                              weight_decay=cfg.weight_decay, warmup=cfg.warmup_steps, seed=cfg.seed,
                              precision=cfg.precision, device=device,
                              callback=lambda **s: bar.advance(loss=s["loss"]))
    path = save_clip(out / "clip.safetensors", encoders)
    held_out = ShapesDataset(ShapesWorld(seed=recipe.data.shapes_seed + 1, image_size=size), 500) \
        if recipe.data.source == "shapes" else None
    result = {"model": str(path)}
    if held_out is not None:
        pairs = [held_out[i] for i in range(len(held_out))]
        scores = retrieval_top1(encoders, torch.stack([x for x, _ in pairs]).to(device), [c for _, c in pairs])
        result.update(scores)
    (out / "clip-eval.json").write_text(__import__("json").dumps(result, indent=2))
    emit_json(result)
    print_table("clip training finished", list(result), [list(result.values())])
