"""The bundled default model: it loads offline, and what it draws passes the judge's colour check."""

import numpy as np
import pytest

from ctxdiff.data.png import to_uint8
from ctxdiff.formats.t2i import DEFAULT_MODEL
from ctxdiff.pipelines.text2image import Text2Image
from ctxdiff.recipes import SampleConfig
from ctxdiff.shapes.judge import judge


@pytest.mark.skipif(not DEFAULT_MODEL.exists(), reason="the bundled model is not installed")
def test_bundled_model_draws_the_asked_colours():
    pipe = Text2Image.from_bundle(DEFAULT_MODEL)
    assert pipe.image_size == 64 and pipe.base.adapter is not None and pipe.sr is not None
    prompts = ["a red circle", "a blue square"]
    images = to_uint8(pipe.sample(prompts, [0, 1], SampleConfig(steps=20, sr_steps=10, guidance=3.0)))
    assert images.shape == (2, 64, 64, 3)
    assert all(judge(image, prompt).colour for image, prompt in zip(images, prompts))
    assert np.abs(images[0].astype(int) - images[1].astype(int)).mean() > 5
