"""The shapes world (generator, captions, videos, sample folders) and its judge."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch
from PIL import Image

from ctxdiff.cli import main
import ctxdiff.cli.shapes  # noqa: F401  (registers `ctxdiff shapes`)
from ctxdiff.errors import CtxdiffError
from ctxdiff.shapes.captions import BACKGROUND_COLOURS, MOTIONS, OBJECT_COLOURS, SHAPES, parse_caption
from ctxdiff.shapes.datasets import ShapesDataset, ShapeTwinsDataset, colour_layout, write_samples
from ctxdiff.shapes.judge import judge, judge_many, judge_video
from ctxdiff.shapes.render import SHAPE_CENTROID_DROP, render_scene
from ctxdiff.shapes.world import ShapesWorld, held_out_prompts, moving_shape_video, scene_from_caption

OPPOSITE = {"left": "right", "right": "left", "top": "bottom", "bottom": "top", "centre": "left"}


def _replace_object(scene, index, **changes):
    objects = tuple(dataclasses.replace(o, **changes) if i == index else o for i, o in enumerate(scene.objects))
    return dataclasses.replace(scene, objects=objects)


# -- the generator -----------------------------------------------------------------------------

def test_scene_depends_only_on_seed_and_index():
    forward, backward = ShapesWorld(seed=5), ShapesWorld(seed=5)
    scenes = [forward.scene(i) for i in range(20)]
    assert [backward.scene(i) for i in reversed(range(20))][::-1] == scenes
    image, caption = forward.sample(13)
    assert np.array_equal(image, backward.render(backward.scene(13))) and caption == scenes[13].caption


def test_different_seeds_draw_different_worlds():
    a, b = ShapesWorld(seed=0), ShapesWorld(seed=1)
    assert [a.scene(i).caption for i in range(20)] != [b.scene(i).caption for i in range(20)]
    assert not np.array_equal(a.sample(0)[0], b.sample(0)[0])


def test_captions_parse_back_to_the_attributes_the_scene_states():
    world = ShapesWorld(seed=3)
    for index in range(400):
        scene = world.scene(index)
        spec = parse_caption(scene.caption)
        assert spec == scene.spec, scene.caption
        for drawn, stated in zip(scene.objects, spec.objects):
            assert (drawn.colour, drawn.shape) == (stated.colour, stated.shape)
            assert stated.size in (None, drawn.size)
        assert spec.background in (None, scene.background)
        assert scene.background not in {o.colour for o in scene.objects}


def test_world_draws_every_colour_shape_background_and_both_object_counts():
    scenes = [ShapesWorld(seed=0).scene(i) for i in range(300)]
    objects = [o for s in scenes for o in s.objects]
    assert {o.colour for o in objects} == set(OBJECT_COLOURS)
    assert {o.shape for o in objects} == set(SHAPES)
    assert {s.background for s in scenes} == set(BACKGROUND_COLOURS)
    assert {len(s.objects) for s in scenes} == {1, 2}


@pytest.mark.parametrize("text, expected", [
    ("a red circle above a blue square", ("above", None, [("red", "circle", None), ("blue", "square", None)])),
    ("A big red disc in the center.", (None, "centre", [("red", "circle", "large")])),
    ("the green cross on the left of a small yellow triangle on a grey background",
     ("left of", None, [("green", "cross", None), ("yellow", "triangle", "small")])),
])
def test_parse_reads_prompts_people_write(text, expected):
    relation, position, objects = expected
    spec = parse_caption(text)
    assert (spec.relation, spec.position) == (relation, position)
    assert [(o.colour, o.shape, o.size) for o in spec.objects] == objects


@pytest.mark.parametrize("text, named", [("a pink circle", "'pink'"), ("a red hexagon", "'hexagon'"),
                                         ("a red circle, smiling", "'smiling'"),
                                         ("a red circle on a purple background", "'purple'")])
def test_parse_names_the_word_it_cannot_read(text, named):
    with pytest.raises(ValueError, match=named):
        parse_caption(text)


@pytest.mark.parametrize("size", [32, 256])
def test_render_draws_soft_edged_objects_at_any_size(size):
    scene = scene_from_caption("a large red circle in the centre on a white background")
    image = render_scene(scene, size)
    assert image.shape == (size, size, 3) and image.dtype == np.uint8
    colours = {tuple(p) for p in image.reshape(-1, 3)}
    assert {OBJECT_COLOURS["red"], BACKGROUND_COLOURS["white"]} <= colours
    assert len(colours) > 3                            # blended edge pixels: anti-aliased
    red = np.all(image == OBJECT_COLOURS["red"], axis=-1)
    assert 0.1 < red.mean() < 0.14                     # a disc of diameter 0.42: area 0.139 with its edge
    assert judge(image, scene.caption).all_correct


def test_dataset_gives_chw_floats_in_minus_one_to_one_with_captions():
    dataset = ShapesDataset(ShapesWorld(seed=2, image_size=32), count=4)
    x, caption = dataset[3]
    assert len(dataset) == 4 and x.shape == (3, 32, 32) and x.dtype == torch.float32
    assert x.min() >= -1 and x.max() <= 1 and caption == ShapesWorld(seed=2).scene(3).caption
    with pytest.raises(IndexError):
        dataset[4]


def _differences(a, b) -> set[str]:
    """Which stated attributes of two scene specs differ ('binding': the shapes changed places)."""
    shapes = [o.shape for o in a.objects]
    if len(shapes) == 2 and shapes[0] != shapes[1] and [o.shape for o in b.objects] == shapes[::-1] \
            and [o.colour for o in a.objects] == [o.colour for o in b.objects]:
        swapped = tuple(dataclasses.replace(o, shape=s) for o, s in zip(a.objects, shapes[::-1]))
        return {"binding"} | _differences(dataclasses.replace(a, objects=swapped), b)
    changed = {name for name in ("position", "relation", "background") if getattr(a, name) != getattr(b, name)}
    for x, y in zip(a.objects, b.objects):
        changed |= {name for name in ("colour", "shape", "size") if getattr(x, name) != getattr(y, name)}
    return changed


def test_twin_differs_in_the_named_attribute_only_and_the_judge_tells_them_apart():
    world = ShapesWorld(seed=6, image_size=32)
    seen = set()
    for index in range(200):
        scene, twin, attribute = world.scene_and_twin(index)
        assert scene == world.scene(index)
        assert _differences(parse_caption(scene.caption), parse_caption(twin.caption)) == {attribute}
        if attribute in ("colour", "shape", "background"):   # unstated placement comes from the same stream
            assert [(o.cx, o.cy) for o in twin.objects] == [(o.cx, o.cy) for o in scene.objects]
        assert judge(world.render(twin), twin.caption).all_correct
        wrong = judge(world.render(scene), twin.caption).attributes()
        assert False in ([wrong["shape"]] if attribute == "binding" else [wrong[attribute]]), (attribute, wrong)
        seen.add(attribute)
    assert seen == {"colour", "shape", "size", "position", "relation", "background", "binding"}


def test_twins_dataset_gives_a_scene_and_its_twin_as_one_group():
    world = ShapesWorld(seed=2, image_size=16)
    x, captions = ShapeTwinsDataset(world, count=3)[1]
    scene, twin, _ = world.scene_and_twin(1)
    assert x.shape == (2, 3, 16, 16) and captions == [scene.caption, twin.caption]
    assert torch.equal(x[0], ShapesDataset(world, count=3)[1][0])


def test_held_out_prompts_have_the_asked_number_of_objects_and_come_from_a_new_stream():
    single, two = held_out_prompts(30, seed=0, kind="single"), held_out_prompts(30, seed=0, kind="two")
    assert all(len(parse_caption(p).objects) == 1 for p in single)
    assert all(len(parse_caption(p).objects) == 2 for p in two)
    assert held_out_prompts(30, seed=0, kind="two") == two
    assert held_out_prompts(30, seed=1, kind="two") != two


# -- the judge ---------------------------------------------------------------------------------

@pytest.mark.parametrize("size", [32, 64])
def test_judge_accepts_the_worlds_own_images(size):
    world = ShapesWorld(seed=11, image_size=size)
    samples = [world.sample(i) for i in range(150)]
    report = judge_many([image for image, _ in samples], [caption for _, caption in samples])
    assert not report.unparseable
    for group in ("single", "two"):
        stated = {name: t for name, t in report.groups[group].attributes.items() if t.stated}
        assert {"colour", "shape", "size", "background", "count"} <= set(stated)
        assert ("position" if group == "single" else "relation") in stated
        for name, tally in stated.items():
            assert tally.accuracy >= 0.99, (group, name, tally)


def test_judge_accepts_scenes_drawn_from_held_out_prompts():
    prompts = held_out_prompts(40, seed=4)
    report = judge_many([render_scene(scene_from_caption(p, seed=1), 48) for p in prompts], prompts)
    assert report.all_correct_rate() == 1.0


@pytest.mark.parametrize("size", [32, 64])
def test_judge_fails_recoloured_reshaped_and_moved_objects(size):
    world = ShapesWorld(seed=21, image_size=size)
    caught = {"colour": [], "shape": [], "position": [], "relation": []}
    for index in range(60):
        scene = world.scene(index)
        k = index % len(scene.objects)
        taken = {o.colour for o in scene.objects} | {scene.background}
        colour = [c for c in OBJECT_COLOURS if c not in taken][index % (len(OBJECT_COLOURS) - len(taken))]
        shape = [s for s in SHAPES if s != scene.objects[k].shape][index % 3]
        wrong = {"colour": _replace_object(scene, k, colour=colour), "shape": _replace_object(scene, k, shape=shape)}
        if scene.spec.position is not None:
            moved = dataclasses.replace(scene.spec, position=OPPOSITE[scene.spec.position])
            wrong["position"] = dataclasses.replace(scene_from_caption(moved.caption(), seed=index), caption=scene.caption)
        if scene.spec.relation is not None:
            a, b = scene.objects
            wrong["relation"] = dataclasses.replace(scene, objects=(dataclasses.replace(a, cx=b.cx, cy=b.cy),
                                                                     dataclasses.replace(b, cx=a.cx, cy=a.cy)))
        for attribute, bad in wrong.items():
            caught[attribute].append(getattr(judge(render_scene(bad, size), scene.caption), attribute) is False)
    for attribute, results in caught.items():
        assert len(results) >= 10 and all(results), attribute


def test_judge_fails_the_wrong_background_and_an_extra_object():
    scene = scene_from_caption("a large blue square on the left on a white background", seed=0)
    on_black = judge(render_scene(dataclasses.replace(scene, background="black"), 64), scene.caption)
    assert on_black.background is False and on_black.colour and on_black.shape
    crowded = dataclasses.replace(scene, objects=scene.objects + (
        dataclasses.replace(scene.objects[0], colour="red", size="small", cx=0.8, cy=0.8),))
    verdict = judge(render_scene(crowded, 64), scene.caption)
    assert verdict.count is False and verdict.colour and verdict.position


def test_judge_reads_float_images_channels_first():
    x, caption = ShapesDataset(ShapesWorld(seed=8), count=1)[0]
    assert judge((x + 1) / 2, caption).all_correct


def test_judge_lists_unparseable_prompts_and_fails_an_empty_image():
    blank = np.full((32, 32, 3), 255, np.uint8)
    report = judge_many([blank, blank], ["a red circle", "a mauve circle"])
    assert [c for c, _ in report.unparseable] == ["a mauve circle"]
    assert report.accuracy("colour") == 0.0 and report.accuracy("background") is None
    record = report.to_dict()
    assert record["groups"]["single"]["attributes"]["shape"] == {"correct": 0, "stated": 1, "accuracy": 0.0}
    assert ("all", "colour", 0, 1, 0.0) in report.rows()
    json.dumps(record)


# -- videos ------------------------------------------------------------------------------------

@pytest.mark.parametrize("direction", MOTIONS)
def test_video_object_moves_in_the_stated_direction(direction):
    words = {"right": "moving to the right", "left": "moving left", "up": "moving up", "down": "moving down"}
    caption = f"a small green cross {words[direction]} on a black background"
    video = moving_shape_video(caption, frames=6, size=32, seed=2)
    assert video.frames.shape == (6, 32, 32, 3) and video.caption == caption
    ys, xs = np.mgrid[0:32, 0:32]
    mass = video.frames.astype(float).sum(axis=-1)                     # black background: object mass
    centroids = np.stack([(mass * xs).sum((1, 2)), (mass * ys).sum((1, 2))], 1) / mass.sum((1, 2))[:, None] / 32
    axis, sign = {"right": (0, 1), "left": (0, -1), "down": (1, 1), "up": (1, -1)}[direction]
    steps = sign * np.diff(centroids[:, axis])
    assert np.all(steps > 0.03) and np.ptp(centroids[:, 1 - axis]) < 1e-3
    assert np.allclose(centroids[:, axis], video.centres[:, axis], atol=0.02)
    assert judge_video(video.frames, caption).all_correct
    assert judge_video(video.frames[::-1], caption).motion is False


def test_video_captions_need_one_moving_object():
    with pytest.raises(ValueError, match="moving"):
        moving_shape_video("a red circle above a blue square")


# -- sample folders and the command --------------------------------------------------------------

def test_write_samples_writes_image_caption_pairs(tmp_path):
    paths = write_samples(tmp_path / "out", 3, seed=4, size=32)
    assert [p.name for p in paths] == ["00000.png", "00001.png", "00002.png"]
    world = ShapesWorld(seed=4, image_size=32)
    for index, path in enumerate(paths):
        image, caption = world.sample(index)
        assert np.array_equal(np.asarray(Image.open(path)), image)
        assert path.with_suffix(".txt").read_text().strip() == caption


def test_write_samples_writes_videos_as_frame_folders(tmp_path):
    (folder,) = write_samples(tmp_path, 1, size=32, kind="videos", frames=4)
    assert sorted(p.name for p in folder.iterdir()) == ["00000.png", "00001.png", "00002.png", "00003.png"]
    assert "moving" in (tmp_path / "00000.txt").read_text()
    assert len(json.loads((tmp_path / "00000.json").read_text())["centres"]) == 4


def test_write_samples_refuses_a_non_empty_folder_without_force(tmp_path):
    (tmp_path / "notes.md").write_text("keep me")
    with pytest.raises(CtxdiffError, match="not empty"):
        write_samples(tmp_path, 2)
    write_samples(tmp_path, 2, force=True)
    assert (tmp_path / "notes.md").read_text() == "keep me" and (tmp_path / "00001.txt").exists()


def test_shapes_command_prints_a_json_line_per_sample_and_refuses_a_full_folder(tmp_path, capsys):
    assert main(["--json", "--quiet", "shapes", str(tmp_path / "out"), "--n", "2", "--size", "32"]) == 0
    records = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [r["index"] for r in records] == [0, 1]
    assert records[1]["caption"] == (tmp_path / "out" / "00001.txt").read_text().strip()
    assert main(["--quiet", "shapes", str(tmp_path / "out"), "--n", "2"]) == 2
    error = capsys.readouterr().err
    assert "already holds files" in error and "--force" in error and len(error.strip().splitlines()) == 1


@pytest.mark.parametrize("size", [32, 64])
def test_colour_layout_reads_every_object_position_from_the_pixels(size):
    world = ShapesWorld(seed=3, image_size=size)
    names = list(OBJECT_COLOURS)
    scenes = [world.scene(i) for i in range(80)]
    images = torch.stack([torch.from_numpy(world.render(s)) for s in scenes]).permute(0, 3, 1, 2).float() / 127.5 - 1
    centroids, present = colour_layout(images)
    for scene, where, seen in zip(scenes, centroids, present):
        assert {names[k] for k in seen.nonzero().flatten().tolist()} == {o.colour for o in scene.objects}
        for obj in scene.objects:
            # the pixels' centroid is the box centre, but a triangle's lies extent/6 lower
            expected = torch.tensor([obj.cx, obj.cy + SHAPE_CENTROID_DROP[obj.shape] * obj.extent])
            assert torch.dist(where[names.index(obj.colour)], expected) < 0.03, (scene.caption, where, expected)
    mirrored, _ = colour_layout(images.flip(-1))          # and it reads the image, not the caption
    assert torch.allclose(mirrored[..., 0][present], 1 - centroids[..., 0][present], atol=1e-5)


def test_unknown_words_are_those_the_world_has_no_meaning_for():
    from ctxdiff.shapes.captions import unknown_words

    assert unknown_words("a cat in armor") == ["cat", "armor"]
    assert unknown_words("A small red circle on the left, on a grey background") == []
    world = ShapesWorld(seed=2)
    assert all(unknown_words(world.scene(i).caption) == [] for i in range(200))
