"""A tiny pixel video model for tests: any weights will do where a property holds for every model."""

from dataclasses import replace
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import torch

from ctxdiff.formats.t2i import save_t2i_bundle
from ctxdiff.models.adapter import ADAPTER_PRESETS, build_adapter
from ctxdiff.models.encoders import ClipConfig, load_clip
from ctxdiff.models.stage import Stage
from ctxdiff.models.unet import UNET_PRESETS, UNet
from ctxdiff.pipelines.video_model import VideoModel
from ctxdiff.recipes import DiffusionConfig
from ctxdiff.shapes.world import moving_shape_video

SRC = "a red circle moving to the right"


def tiny_video_bundle(folder: Path, seed: int = 0) -> Path:
    """An untrained 16x16 t2i bundle (tiny CLIP, U-Net, CLIP-branch adapter), weights perturbed."""
    return tiny_bundle(folder / f"tiny-{seed}.safetensors", seed)


def tiny_bundle(path: Path, seed: int, noise: float = 0.05, extra: dict | None = None, **configs) -> Path:
    """An untrained 16x16 t2i bundle (tiny CLIP, U-Net and CLIP-branch adapter; T = 100) with every
    weight perturbed by `noise`; `configs` (e.g. sample=SampleConfig(...)) join its diffusion config."""
    torch.manual_seed(seed)
    clip = load_clip(ClipConfig(arch="tiny-clip"))
    unet = UNet(replace(UNET_PRESETS["tiny"], image_size=16, timesteps=100))
    adapter = build_adapter(replace(ADAPTER_PRESETS["tiny"], x_shape=(3, 16, 16), patch_size=4, timesteps=100), clip)
    with torch.no_grad():
        for p in [*unet.parameters(), *adapter.parameters()]:
            p.add_(noise * torch.randn_like(p))
    return save_t2i_bundle(path, clip, {"": Stage(unet, adapter)},
                           {"diffusion": DiffusionConfig(schedule="cosine", timesteps=100), **configs}, extra=extra)


def tiny_video_model(folder: Path, seed: int = 0) -> VideoModel:
    return VideoModel.load(tiny_video_bundle(folder, seed))


def shapes_frames(frames: int, height: int, width: int, seed: int = 9200) -> np.ndarray:
    side = max(height, width)
    clip = moving_shape_video(SRC, frames=frames, size=side, seed=seed).frames
    top, left = (side - height) // 2, (side - width) // 2
    return np.ascontiguousarray(clip[:, top:top + height, left:left + width])


def write_mp4_with_sound(path: Path, frames: np.ndarray, fps: int, seconds_of_sound: float | None = None) -> Path:
    """An H.264 mp4 with a 440 Hz AAC track as long as the video (or `seconds_of_sound`)."""
    rate = 22050
    seconds = seconds_of_sound if seconds_of_sound is not None else len(frames) / fps
    tone = (0.3 * np.sin(2 * np.pi * 440 * np.arange(int(rate * seconds)) / rate)).astype(np.float32)[None]
    with av.open(str(path), "w") as container:
        video = None
        if len(frames):
            video = container.add_stream("libx264", rate=Fraction(fps))
            video.height, video.width, video.pix_fmt = frames.shape[1], frames.shape[2], "yuv420p"
        sound = container.add_stream("aac", rate=rate)
        sound.layout = "mono"
        for pts in range(0, tone.shape[1], 1024):
            frame = av.AudioFrame.from_ndarray(np.ascontiguousarray(tone[:, pts:pts + 1024]), format="fltp",
                                               layout="mono")
            frame.sample_rate, frame.pts = rate, pts
            container.mux(sound.encode(frame))
        container.mux(sound.encode())
        for f in frames:
            container.mux(video.encode(av.VideoFrame.from_ndarray(f, format="rgb24")))
        if video is not None:
            container.mux(video.encode())
    return path


def assert_resume_is_exact(make_tuner) -> None:
    """make_tuner(run folder name, resume) -> a VideoTuner: a run stopped at step 2 of 4 and resumed
    ends with the tuned tensors of the uninterrupted run, bit for bit."""
    full = make_tuner("full", False)
    full.run()
    part = make_tuner("part", False)
    assert part.run(should_stop=lambda: part.step >= 2).interrupted
    resumed = make_tuner("part", True)
    assert resumed.step == 2 and resumed.run().step == 4
    for (name, a), b in zip(full.model.unet.tunable_state().items(), resumed.model.unet.tunable_state().values()):
        assert torch.equal(a, b), name
    for (name, a), b in zip(full.model.adapter.state_dict().items(), resumed.model.adapter.state_dict().values()):
        assert torch.equal(a, b), name
