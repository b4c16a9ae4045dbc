"""Data for class and layout models: the shapes world, ImageNet-style folders, COCO instances JSON."""

import json

import numpy as np
import pytest
from PIL import Image

from ctxdiff.data.conditions import ClassFolders, CocoLayouts, crop_box, open_condition_dataset, shapes_labels
from ctxdiff.errors import CtxdiffError


def test_shapes_class_is_the_colour_and_shape_of_a_single_object():
    data = open_condition_dataset("class", "shapes", 16, shapes_count=5)
    for i in range(5):
        image, label = data[i]
        scene = data.world.scene(i)
        assert image.shape == (3, 16, 16) and len(scene.objects) == 1
        assert label == f"{scene.objects[0].colour} {scene.objects[0].shape}" and label in data.labels


def test_shapes_layout_boxes_are_the_objects_centre_and_extent():
    data = open_condition_dataset("layout", "shapes", 16, shapes_count=8)
    assert data.labels == shapes_labels()
    for i in range(8):
        _, layout = data[i]
        for obj, drawn in zip(layout, data.world.scene(i).objects):
            x0, y0, x1, y1 = obj.box
            assert obj.label == f"{drawn.colour} {drawn.shape}"
            assert (x0 + x1) / 2 == pytest.approx(drawn.cx, abs=1e-5) and x1 - x0 == pytest.approx(drawn.extent)
            assert 0 <= x0 < x1 <= 1 and 0 <= y0 < y1 <= 1
    assert {len(data[i][1]) for i in range(8)} == {1, 2}


def _image(path, size=(20, 10)):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((size[1], size[0], 3), 128, np.uint8)).save(path)


def test_imagenet_style_folder_tree_gives_the_folder_name_as_class(tmp_path):
    _image(tmp_path / "n01-tench" / "a.jpg")
    _image(tmp_path / "n01-tench" / "sub" / "b.png")
    _image(tmp_path / "goldfish" / "c.JPEG")
    (tmp_path / "goldfish" / "broken.jpg").write_bytes(b"not an image")
    data = ClassFolders(tmp_path, 8)
    assert data.labels == ("goldfish", "n01-tench") and len(data) == 3 and data.skipped == 1
    assert sorted(data[i][1] for i in range(3)) == ["goldfish", "n01-tench", "n01-tench"]
    assert data[0][0].shape == (3, 8, 8)


def test_empty_class_tree_is_refused(tmp_path):
    with pytest.raises(CtxdiffError, match="one folder per class"):
        open_condition_dataset("class", str(tmp_path), 8)


def test_coco_instances_give_layouts_in_the_centre_crop(tmp_path):
    _image(tmp_path / "val2017" / "1.jpg", (200, 100))
    _image(tmp_path / "val2017" / "2.jpg", (100, 100))
    coco = {"images": [{"id": 1, "file_name": "1.jpg", "width": 200, "height": 100},
                       {"id": 2, "file_name": "2.jpg", "width": 100, "height": 100},
                       {"id": 3, "file_name": "missing.jpg", "width": 10, "height": 10}],
            "annotations": [{"image_id": 1, "category_id": 18, "bbox": [50, 0, 50, 50], "iscrowd": 0},
                            {"image_id": 1, "category_id": 1, "bbox": [0, 0, 40, 40], "iscrowd": 0},   # cropped off
                            {"image_id": 2, "category_id": 1, "bbox": [10, 20, 30, 40], "iscrowd": 0},
                            {"image_id": 2, "category_id": 18, "bbox": [0, 0, 100, 100], "iscrowd": 1}],
            "categories": [{"id": 18, "name": "dog"}, {"id": 1, "name": "person"}]}
    path = tmp_path / "annotations" / "instances_val2017.json"
    path.parent.mkdir()
    path.write_text(json.dumps(coco))
    data = open_condition_dataset("layout", str(path), 8)
    assert isinstance(data, CocoLayouts) and data.labels == ("person", "dog")
    assert len(data) == 2 and data.missing == 1
    image, layout = data[0]
    assert image.shape == (3, 8, 8)
    assert [o.label for o in layout] == ["dog"] and layout[0].box == pytest.approx((0, 0, 0.5, 0.5))
    assert data[1][1][0].box == pytest.approx((0.1, 0.2, 0.4, 0.6))


def test_crop_box_clips_to_the_square_and_drops_what_is_cut_off():
    assert crop_box([90, 40, 40, 20], 200, 100) == pytest.approx((0.4, 0.4, 0.8, 0.6))
    assert crop_box([0, 0, 40, 40], 200, 100) is None


def test_a_file_that_is_not_coco_is_named(tmp_path):
    path = tmp_path / "x.json"
    path.write_text("[]")
    with pytest.raises(CtxdiffError, match="not a COCO instances file"):
        open_condition_dataset("layout", str(path), 8)


def test_the_judge_passes_drawn_scenes_against_their_own_class_and_layout():
    from ctxdiff.data.layouts import LayoutObject
    from ctxdiff.shapes.judge import condition_accuracy, judge_layout

    classes = open_condition_dataset("class", "shapes", 64, shapes_count=6)
    images = [((classes[i][0] + 1) * 127.5).round().byte() for i in range(6)]
    assert condition_accuracy(images, [classes[i][1] for i in range(6)])["all"] == 1.0
    layouts = open_condition_dataset("layout", "shapes", 64, shapes_count=6)
    images = [((layouts[i][0] + 1) * 127.5).round().byte() for i in range(6)]
    report = condition_accuracy(images, [layouts[i][1] for i in range(6)])
    assert report["all"] == 1.0 and report["iou"] > 0.7
    obj = layouts[0][1][0]
    x0, y0, x1, y1 = obj.box
    shift = 0.5 if x1 < 0.5 else -0.5      # the same object asked for elsewhere: not placed
    moved = LayoutObject(obj.label, (x0 + shift, y0, x1 + shift, y1))
    verdict = judge_layout(images[0], (moved,))[0]
    assert verdict.colour and verdict.shape and not verdict.placed
