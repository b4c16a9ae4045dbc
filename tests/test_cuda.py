"""The same code on a CUDA device (skipped where there is none): math, models, training, generation."""

import pytest
import torch

from ctxdiff.cli import main
from ctxdiff.diffusion import ddim_step, make_schedule, q_posterior
from ctxdiff.models.adapter import ADAPTER_PRESETS, ContextAdapter
from ctxdiff.models.conditioning import TextCondition
from ctxdiff.models.unet import UNET_PRESETS, UNet
from ctxdiff.pipelines.text2image import Text2Image
from ctxdiff.recipes import SampleConfig
from ctxdiff.training.recipe import read_recipe
from ctxdiff.training.trainer import Trainer

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
CUDA = torch.device("cuda")


def cond_of(batch, text_dim=32, device="cpu"):
    g = torch.Generator().manual_seed(1)
    return TextCondition(torch.randn(batch, 5, text_dim, generator=g), torch.ones(batch, 5, dtype=torch.bool),
                         torch.randn(batch, text_dim, generator=g)).to(device)


def test_steps_on_cuda_match_the_cpu():
    sched = make_schedule("cosine", 1000)
    adapter = ContextAdapter(ADAPTER_PRESETS["tiny"])
    torch.nn.init.normal_(adapter.head.weight, std=0.05)
    x_t, x0 = torch.randn(2, 3, 32, 32), torch.randn(2, 3, 32, 32)
    cpu = ddim_step(sched, x_t, 500, 400, x0, adapter, cond_of(2))
    adapter_gpu = adapter.to(CUDA)
    gpu = ddim_step(sched, x_t.to(CUDA), 500, 400, x0.to(CUDA), adapter_gpu, cond_of(2, device=CUDA))
    assert gpu.device.type == "cuda" and torch.allclose(gpu.cpu(), cpu, atol=1e-4)
    mean, var = q_posterior(sched, x_t.to(CUDA), x0.to(CUDA), 7, adapter_gpu, cond_of(2, device=CUDA))
    assert mean.device.type == "cuda" and torch.isfinite(mean).all()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_unet_and_adapter_train_under_autocast_on_cuda(dtype):
    unet, adapter = UNet(UNET_PRESETS["tiny"]).to(CUDA), ContextAdapter(ADAPTER_PRESETS["tiny"]).to(CUDA)
    x, t, cond = torch.randn(4, 3, 32, 32, device=CUDA), torch.tensor([1, 10, 500, 1000], device=CUDA), cond_of(4, device=CUDA)
    with torch.autocast("cuda", dtype=dtype):
        out = unet(x + adapter(x, cond, t), t, cond)
    out.float().pow(2).mean().backward()
    assert torch.isfinite(out).all()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in unet.parameters() if p.requires_grad)
    cpu = UNet(UNET_PRESETS["tiny"])
    cpu.load_state_dict({k: v.cpu() for k, v in unet.state_dict().items()})
    with torch.no_grad():
        assert torch.allclose(unet(x, t, cond).cpu(), cpu(x.cpu(), t.cpu(), cond.to("cpu")), atol=1e-3)


def test_training_and_generation_run_on_cuda(tiny_recipe, tmp_path):
    trainer = Trainer(read_recipe(tiny_recipe(), ["train.precision=bf16"]), CUDA)
    result = trainer.run()
    assert result.step == 6 and result.loss == result.loss
    pipe = Text2Image.from_bundle(result.model_path, CUDA)
    images = pipe.sample(["a red circle", "a blue square"], [1, 2], SampleConfig(steps=4))
    cpu_pipe = Text2Image.from_bundle(result.model_path, "cpu")
    cpu_images = cpu_pipe.sample(["a red circle", "a blue square"], [1, 2], SampleConfig(steps=4))
    assert images.device.type == "cuda" and torch.allclose(images.cpu(), cpu_images, atol=2e-2)
    assert main(["--device", "cuda", "generate", "a red circle", "--model", str(result.model_path), "--steps", "3",
                 "--out", str(tmp_path / "out")]) == 0
