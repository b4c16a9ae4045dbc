"""`ctxdiff generate` with what Stable Diffusion users expect (issue 20): every sampler, --karras, negative
prompts, img2img and inpainting, LoRA; the bad inputs as one line and a non-zero exit."""

from __future__ import annotations

import json

import numpy as np
import pytest
import safetensors.torch
import torch
from PIL import Image

from ctxdiff.cli import main
from ctxdiff.cli.generate import SAMPLERS
from ctxdiff.data.png import read_png_metadata
from ctxdiff.formats.t2i import DEFAULT_MODEL
from ctxdiff.models.latent import save_compvis
from ctxdiff.recipes import SampleConfig
from tiny_sd import tiny_sd_models

bundled = pytest.mark.skipif(not DEFAULT_MODEL.exists(), reason="the bundled model is not installed")
LORA_KEY = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k"


@pytest.fixture(scope="module")
def sd_path(tmp_path_factory):
    return save_compvis(tmp_path_factory.mktemp("sd") / "tiny-sd.safetensors", tiny_sd_models(0))


@pytest.fixture(scope="module")
def cached_bundle():
    """The bundled model loaded once for the module (each `main` call would load it again)."""
    from ctxdiff.pipelines.text2image import Text2Image

    return Text2Image.from_bundle(DEFAULT_MODEL, "cpu") if DEFAULT_MODEL.exists() else None


@pytest.fixture
def bundle(cached_bundle, monkeypatch):
    from ctxdiff.pipelines.text2image import Text2Image

    monkeypatch.setattr(Text2Image, "from_bundle", classmethod(lambda cls, path, device="cpu": cached_bundle))
    return cached_bundle


def _records(capsys, argv: list[str]) -> list[dict]:
    code = main(["--json", "-q", "--device", "cpu", "generate", *argv])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    return [json.loads(line) for line in captured.out.splitlines()]


def _one_line_error(capsys, argv: list[str], code: int | None = None) -> str:
    got = main(["-q", "--device", "cpu", "generate", *argv])
    err = capsys.readouterr().err.strip()
    assert got != 0 and (code is None or got == code), (got, err)
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    return err


def _pixels(path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB")).astype(np.int16)


def _save(path, array: np.ndarray):
    Image.fromarray(array.astype(np.uint8)).save(path)
    return path


def _init_picture(size: int) -> np.ndarray:
    """A red disc on a light background: an init image the shapes world could have drawn."""
    yy, xx = np.mgrid[:size, :size]
    image = np.full((size, size, 3), 230, np.uint8)
    image[(yy - size / 2) ** 2 + (xx - size / 2) ** 2 < (size / 4) ** 2] = (200, 30, 30)
    return image


# --------------------------------------------------------------------------- samplers

def test_the_cli_offers_exactly_the_library_samplers():
    assert SAMPLERS == SampleConfig.SAMPLERS


@bundled
@pytest.mark.parametrize("sampler", SampleConfig.SAMPLERS)
def test_every_sampler_generates_on_the_bundled_model(sampler, bundle, tmp_path, capsys):
    (record,) = _records(capsys, ["a red circle", "--sampler", sampler, "--steps", "2", "--sr-steps", "1",
                                  "--seed", "3", "--out", str(tmp_path)])
    assert record["sampler"] == sampler and read_png_metadata(record["path"])["sampler"] == sampler
    assert _pixels(record["path"]).shape == (64, 64, 3)


@pytest.mark.parametrize("sampler", SampleConfig.SAMPLERS)
def test_every_sampler_generates_on_a_tiny_sd_checkpoint(sampler, sd_path, tmp_path, capsys):
    (record,) = _records(capsys, ["a red circle", "--model", str(sd_path), "--sampler", sampler, "--steps", "3",
                                  "--seed", "3", "--out", str(tmp_path)])
    assert record["sampler"] == sampler and read_png_metadata(record["path"])["steps"] == 3
    assert _pixels(record["path"]).shape == (16, 16, 3)


def test_karras_appends_karras_to_a_solver_and_gives_its_images(sd_path, tmp_path, capsys):
    common = ["a red circle", "--model", str(sd_path), "--steps", "3", "--seed", "3"]
    (flag,) = _records(capsys, [*common, "--sampler", "dpmpp-2m", "--karras", "--out", str(tmp_path / "flag")])
    (name,) = _records(capsys, [*common, "--sampler", "dpmpp-2m-karras", "--out", str(tmp_path / "name")])
    assert flag["sampler"] == name["sampler"] == "dpmpp-2m-karras"
    assert np.array_equal(_pixels(flag["path"]), _pixels(name["path"]))


@pytest.mark.parametrize("sampler", ["ddim", "ddpm"])
def test_karras_is_refused_with_ddim_and_ddpm(sampler, sd_path, tmp_path, capsys):
    err = _one_line_error(capsys, ["x", "--model", str(sd_path), "--sampler", sampler, "--karras",
                                   "--out", str(tmp_path)], 2)
    assert "--karras" in err and sampler in err
    assert not tmp_path.exists() or not any(tmp_path.iterdir())


@pytest.mark.parametrize("spelled, close", [("dpmpp2m", "dpmpp-2m"), ("DPM++ 2M Karras", "dpmpp-2m-karras"),
                                            ("eulera", "euler-a"), ("unpc", "unipc")])
def test_an_unknown_sampler_is_one_line_naming_the_close_match(spelled, close, tmp_path, capsys):
    err = _one_line_error(capsys, ["x", "--sampler", spelled, "--out", str(tmp_path)], 2)
    assert f"did you mean {close!r}" in err


def test_eta_with_a_solver_is_a_warning(sd_path, tmp_path, capsys):
    assert main(["--device", "cpu", "generate", "x", "--model", str(sd_path), "--sampler", "euler", "--eta", "0.5",
                 "--steps", "2", "--out", str(tmp_path)]) == 0
    assert "--eta applies to ddim only" in capsys.readouterr().err


# --------------------------------------------------------------------------- negative prompts

def test_negative_prompts_from_the_flag_and_from_file_lines_are_used_and_recorded(sd_path, tmp_path, capsys):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle --negative a green cross\na blue square\n")
    common = ["--model", str(sd_path), "--steps", "3", "--seed", "3", "--guidance", "7.5"]
    records = _records(capsys, ["--from-file", str(prompts), "--negative", "blurry", *common,
                                "--out", str(tmp_path / "neg")])
    assert [(r["prompt"], r["negative"]) for r in records] == [("a red circle", "a green cross"),
                                                               ("a blue square", "blurry")]
    assert [read_png_metadata(r["path"])["negative"] for r in records] == ["a green cross", "blurry"]
    plain = _records(capsys, ["a red circle", "a blue square", *common, "--out", str(tmp_path / "plain")])
    assert all("negative" not in r for r in plain)
    for with_negative, without in zip(records, plain):
        assert not np.array_equal(_pixels(with_negative["path"]), _pixels(without["path"]))


# --------------------------------------------------------------------------- img2img and inpainting

@bundled
def test_img2img_moves_away_from_the_init_image_as_strength_grows(bundle, tmp_path, capsys):
    init = _save(tmp_path / "init.png", _init_picture(64))
    distance = {}
    for strength in ("0.1", "0.5", "1"):
        (record,) = _records(capsys, ["a blue square", "--init-image", str(init), "--strength", strength,
                                      "--steps", "10", "--sr-steps", "4", "--seed", "5",
                                      "--out", str(tmp_path / strength)])
        assert (record["init_image"], record["strength"]) == (str(init), float(strength))
        assert read_png_metadata(record["path"])["strength"] == float(strength)
        distance[strength] = np.abs(_pixels(record["path"]) - _pixels(init)).mean()
    assert distance["0.1"] < 8 and 3 * distance["0.1"] < distance["0.5"] < distance["1"], distance   # of 255 levels


@bundled
def test_a_mask_keeps_the_unmasked_pixels_of_the_init_image(bundle, tmp_path, capsys):
    init = _save(tmp_path / "init.png", _init_picture(64))
    painted = np.zeros((64, 64, 3), np.uint8)
    painted[:, :32] = 255                                    # repaint the left half
    mask = _save(tmp_path / "mask.png", painted)
    (record,) = _records(capsys, ["a blue square on the left", "--init-image", str(init), "--mask", str(mask),
                                  "--strength", "1", "--steps", "6", "--sr-steps", "3", "--seed", "5",
                                  "--out", str(tmp_path / "out")])
    assert record["mask"] == str(mask)
    change = np.abs(_pixels(record["path"]) - _pixels(init))
    assert change[:, 32:].max() <= 3 and change[:, :32].mean() > 10


def test_a_tiny_sd_inpainting_keeps_the_unmasked_pixels(sd_path, tmp_path, capsys):
    init = _save(tmp_path / "init.png", _init_picture(16))
    painted = np.zeros((16, 16), np.uint8)
    painted[:8] = 255
    mask = _save(tmp_path / "mask.png", painted)
    (record,) = _records(capsys, ["x", "--model", str(sd_path), "--init-image", str(init), "--mask", str(mask),
                                  "--steps", "3", "--seed", "5", "--out", str(tmp_path / "out")])
    assert record["strength"] == 0.8                          # the default
    assert np.abs(_pixels(record["path"]) - _pixels(init))[8:].max() <= 1


def test_an_init_image_of_another_size_is_resized_with_a_note(sd_path, tmp_path, capsys):
    init = _save(tmp_path / "init.png", _init_picture(24))
    assert main(["--device", "cpu", "generate", "x", "--model", str(sd_path), "--init-image", str(init),
                 "--steps", "2", "--out", str(tmp_path / "out")]) == 0
    err = capsys.readouterr().err
    assert "warning:" in err and "24x24 resized to the model's 16x16" in err


def test_the_progress_bar_counts_the_steps_strength_leaves(sd_path):
    from ctxdiff.pipelines.batch_generate import progress_steps
    from ctxdiff.pipelines.init_image import InitImage
    from ctxdiff.pipelines.latent import SD_DEFAULTS, LatentText2Image
    from dataclasses import replace

    class Ticks:
        n = 0

        def advance(self, n=1):
            self.n += n

    pipe = LatentText2Image.from_checkpoint(sd_path)
    for sampler, strength in [("ddim", None), ("ddim", 0.5), ("heun", 0.3), ("dpmpp-2m-karras", 1.0)]:
        params = replace(SD_DEFAULTS, sampler=sampler, steps=10, adapter=False)
        ticks = Ticks()
        init = None if strength is None else InitImage(torch.zeros(1, 3, 16, 16), strength)
        pipe.sample(["x"], [1], params, progress=ticks, init=init)
        assert ticks.n == progress_steps(pipe, params, strength), (sampler, strength)
    assert progress_steps(pipe, replace(SD_DEFAULTS, steps=10), 0.5) == 5


@pytest.mark.parametrize("args, message", [
    (["--strength", "0.5"], "only with --init-image"),
    (["--mask", "m.png"], "only with --init-image"),
    (["--init-image", "INIT", "--strength", "0"], "(0, 1]"),
    (["--init-image", "INIT", "--strength", "1.5"], "(0, 1]"),
    (["--init-image", "INIT", "--strength", "nan"], "(0, 1]"),
    (["--init-image", "INIT", "--mask", "SMALL"], "paint the mask at the image's size"),
    (["--init-image", "INIT", "--sampler", "euler-karras", "--strength", "0.5"], "--strength 1"),
])
def test_bad_img2img_inputs_are_one_line_usage_errors(args, message, sd_path, tmp_path, capsys):
    init = _save(tmp_path / "init.png", _init_picture(16))
    small = _save(tmp_path / "small.png", np.zeros((8, 8, 3)))
    args = [{"INIT": str(init), "SMALL": str(small)}.get(a, a) for a in args]
    err = _one_line_error(capsys, ["x", "--model", str(sd_path), "--steps", "2", *args,
                                   "--out", str(tmp_path / "out")], 2)
    assert message in err, err


# --------------------------------------------------------------------------- LoRA

def _lora(path, scale: float = 1.0, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    safetensors.torch.save_file({f"{LORA_KEY}.lora_down.weight": torch.randn(4, 64, generator=g) * scale,
                                 f"{LORA_KEY}.lora_up.weight": torch.randn(32, 4, generator=g) * scale}, str(path))
    return path


def test_loras_are_merged_recorded_and_change_the_image(sd_path, tmp_path, capsys):
    style, other = _lora(tmp_path / "style.safetensors"), _lora(tmp_path / "other.safetensors", seed=1)
    common = ["a red circle", "--model", str(sd_path), "--steps", "3", "--seed", "3"]
    (plain,) = _records(capsys, [*common, "--out", str(tmp_path / "plain")])
    code = main(["--json", "--device", "cpu", "generate", *common, "--lora", f"{style}:0.5", "--lora", str(other),
                 "--out", str(tmp_path / "lora")])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    (record,) = [json.loads(line) for line in captured.out.splitlines()]
    expected = [{"file": str(style), "weight": 0.5}, {"file": str(other), "weight": 1.0}]
    assert record["loras"] == expected and read_png_metadata(record["path"])["loras"] == expected
    assert "LoRA style.safetensors x0.5 (1 U-Net and 0 text-encoder weights)" in captured.err
    assert "loras" not in plain
    assert not np.array_equal(_pixels(record["path"]), _pixels(plain["path"]))


@bundled
def test_a_lora_is_refused_for_a_t2i_bundle(tmp_path, capsys):
    lora = _lora(tmp_path / "style.safetensors")
    err = _one_line_error(capsys, ["x", "--lora", str(lora), "--out", str(tmp_path / "out")], 2)
    assert "--lora" in err and "only for Stable Diffusion checkpoints" in err


@pytest.mark.parametrize("key, family", [("lora_te2_text_model_encoder_layers_0_mlp_fc1.lora_down.weight", "SDXL"),
                                         ("lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight", "Flux")])
def test_a_lora_for_another_architecture_is_one_line_naming_it(key, family, sd_path, tmp_path, capsys):
    path = tmp_path / "other.safetensors"
    safetensors.torch.save_file({key: torch.zeros(4, 64)}, str(path))
    err = _one_line_error(capsys, ["x", "--model", str(sd_path), "--lora", str(path), "--out", str(tmp_path / "o")])
    assert "other.safetensors" in err and family in err, err


def test_lora_weights_that_make_the_image_non_finite_are_one_line(sd_path, tmp_path, capsys):
    lora = _lora(tmp_path / "huge.safetensors", scale=1e20)
    err = _one_line_error(capsys, ["x", "--model", str(sd_path), "--lora", str(lora), "--steps", "2",
                                   "--out", str(tmp_path / "o")])
    assert "NaN or inf" in err or "not finite" in err or "non-finite" in err, err
