"""coco_json.py through the data sets that use it: every field of a COCO json checked for type and range when the data
set is built (training and validation json alike), each bad one a one-line DataError naming the file and the record."""
import json
import re

import pytest

from data import CocoDataset
from test_data import one_line_error, write_image, write_json

def test_json_missing_keys(tmp_path):
    (tmp_path / "a.json").write_text(json.dumps({"images": []}))
    one_line_error(r"a\.json: no list categories, annotations", CocoDataset, str(tmp_path / "a.json"),
                   str(tmp_path))


def test_unknown_category_id(tmp_path):
    ann = {"id": 77, "image_id": 1, "category_id": 99, "bbox": [0, 0, 2, 2], "iscrowd": 0, "segmentation": []}
    path = write_json(tmp_path / "a.json", [{"id": 1, "file_name": "x.png", "height": 4, "width": 4}], [ann])
    one_line_error("annotation id 77 has unknown category_id 99", CocoDataset, path, str(tmp_path))


DROP = object()  # as a parameter value below: delete the field


@pytest.mark.parametrize("part, field, value, culprit", [
    ("annotations", "id", DROP, "annotations[0] has no id"),
    ("categories", "name", DROP, "category id 5 has no name"),
    ("images", "file_name", DROP, "image id 1 has no file_name"),
    ("images", "height", DROP, "image id 1 has no height"),
    ("images", "width", DROP, "image id 1 has no width"),
    ("annotations", "bbox", "1234", "annotation id 7 has bbox '1234', not [x, y, w, h]"),
    ("annotations", "bbox", [1, 1, 4], "annotation id 7 has bbox [1, 1, 4], not [x, y, w, h]"),
    ("annotations", "segmentation", [[1, 2, 3]], "annotation id 7 has a bad segmentation"),
    ("annotations", "segmentation", [[1, 1, 5, 1, 5]], "annotation id 7 has a bad segmentation"),
    ("annotations", "segmentation", [[1, 1, 5, 5]], "annotation id 7 has a bad segmentation"),  # pycocotools: a box
    ("annotations", "segmentation", [[1, 1, 5, 1, 5, "x"]], "annotation id 7 has a bad segmentation"),
    ("annotations", "segmentation", [], "annotation id 7 has a bad segmentation"),
    ("annotations", "segmentation", {"counts": "abc"}, "annotation id 7 has a bad segmentation"),
    ("annotations", "segmentation", {"counts": "abc", "size": [4, 4]}, "annotation id 7 has a bad segmentation"),
    ("annotations", "segmentation", {"counts": "abc", "size": 8}, "annotation id 7 has a bad segmentation"),
    ("annotations", "bbox", [1, 1, float("nan"), 4], "annotation id 7 has bbox [1, 1, nan, 4], not [x, y, w, h]"),
    ("annotations", "bbox", [1, 1, True, 4], "annotation id 7 has bbox [1, 1, True, 4], not [x, y, w, h]"),
    ("annotations", "iscrowd", "0", "annotation id 7 has iscrowd '0', expected 0 or 1"),
    ("annotations", "area", -3, "annotation id 7 has area -3, expected a number >= 0"),  # COCOeval: every AP -1
    ("annotations", "category_id", True, "annotation id 7 has category_id True, expected an integer"),  # not 1
    ("annotations", "image_id", [1], "annotation id 7 has image_id [1], expected an integer"),
    ("annotations", "category_id", {"id": 5}, "annotation id 7 has category_id {'id': 5}, expected an integer"),
    ("images", "id", 10 ** 300, "images[0] has id 1000000000"),  # beyond int64; the message is cut at 60 characters
    ("categories", "keypoints", 17, "category id 5 has keypoints 17, expected a list of keypoint names"),
    ("annotations", "segmentation", {"counts": [10, 20], "size": [8, 8]},  # uncompressed RLE, too short
     "annotation id 7 has a bad segmentation: its RLE counts cover 30 pixels, not height x width = 64"),
    ("annotations", "segmentation", {"counts": "2", "size": [8, 8]},  # compressed RLE, too short (pycocotools hangs)
     "annotation id 7 has a bad segmentation: its RLE counts cover 2 pixels, not height x width = 64"),
    ("annotations", "segmentation", {"counts": [64.0], "size": [8, 8]}, "annotation id 7 has a bad segmentation: its "
     "RLE counts are neither"),
    ("annotations", "segmentation", {"counts": "\x7f", "size": [8, 8]},
     "annotation id 7 has a bad segmentation: its RLE counts are neither"),
    ("images", "width", 30_000_000, "image id 1 (1.png) is 30000000x8, more than 178956970 pixels"),
    ("images", "width", 30_000, "image id 1 (1.png) is 30000x8: resized to a shorter side of 800 with the longer at "
     "most 1333, a side rounds to 0 pixels"),
    ("images", "file_name", "/etc/passwd", "image id 1 has file_name '/etc/passwd', outside the image folder"),
    ("images", "file_name", "../1.png", "image id 1 has file_name '../1.png', outside the image folder"),
    ("annotations", "segmentation", [[1, 1, 5, 1, 1e12, 5]], "annotation id 7 has a bad segmentation: a polygon "
     "coordinate 1000000000000.0 lies far outside the 8x8 image"),  # pycocotools segfaults on it
    ("annotations", "segmentation", [[-1e9, -1e9, 1e9, -1e9, 0, 1e9]],  # pycocotools: an empty mask
     "annotation id 7 has a bad segmentation: a polygon coordinate -1000000000.0 lies far"),
    ("annotations", "bbox", [1, 1, 10 ** 400, 4], "annotation id 7 has bbox [1, 1, 1000"),  # no OverflowError
    ("images", "id", "1", "image id 1 has id '1', expected an integer"),
    ("images", "height", "8", "image id 1 has height '8', expected a positive integer"),
    ("categories", "id", 5.0, "category id 5.0 has id 5.0, expected an integer"),
])
def test_malformed_json_fails_at_setup(tmp_path, part, field, value, culprit):
    """One bad field: a one-line DataError naming the json, the record and the field when the dataset is built,
    not a KeyError from pycocotools or an error in a DataLoader worker mid-training."""
    write_image(tmp_path / "1.png", 8, 8)
    parts = {"images": [{"id": 1, "file_name": "1.png", "height": 8, "width": 8}],
             "annotations": [{"id": 7, "image_id": 1, "category_id": 5, "bbox": [1, 1, 4, 4], "iscrowd": 0,
                              "segmentation": [[1, 1, 5, 1, 5, 5]]}],
             "categories": [{"id": 5, "name": "b"}]}
    assert len(CocoDataset(write_json(tmp_path / "good.json", **parts), str(tmp_path))[0][1]["masks"]) == 1
    if value is DROP:
        del parts[part][0][field]
    else:
        parts[part][0][field] = value
    path = write_json(tmp_path / "bad.json", **parts)
    one_line_error(re.escape(f"{path}: {culprit}"), CocoDataset, path, str(tmp_path))


@pytest.mark.parametrize("part, culprit", [("images", "image id 1 appears twice in images"),
                                            ("annotations", "annotation id 7 appears twice in annotations"),
                                            ("categories", "category id 5 appears twice in categories")])
def test_duplicate_ids_are_refused(tmp_path, part, culprit):
    # pycocotools keeps one of two records with the same id: the other image would be trained on the wrong picture,
    # the other annotation missed by COCOeval, the other category an unused label.
    parts = {"images": [{"id": 1, "file_name": "1.png", "height": 8, "width": 8}],
             "annotations": [{"id": 7, "image_id": 1, "category_id": 5, "bbox": [1, 1, 4, 4], "iscrowd": 0,
                              "segmentation": [[1, 1, 5, 1, 5, 5]]}],
             "categories": [{"id": 5, "name": "b"}]}
    parts[part].append(dict(parts[part][0]))
    path = write_json(tmp_path / "dup.json", **parts)
    one_line_error(re.escape(f"{path}: {culprit}"), CocoDataset, path, str(tmp_path))


def test_a_crowd_rle_that_does_not_cover_its_image_is_refused_in_the_validation_json(tmp_path):
    # COCOeval never returns on such an RLE: it must be refused when the validation set is built, before training
    write_image(tmp_path / "1.png", 8, 8)
    crowd = {"id": 8, "image_id": 1, "category_id": 5, "bbox": [0, 0, 8, 8], "iscrowd": 1, "area": 30,
             "segmentation": {"counts": [10, 20], "size": [8, 8]}}
    path = write_json(tmp_path / "val.json", [{"id": 1, "file_name": "1.png", "height": 8, "width": 8}], [crowd],
                      categories=[{"id": 5, "name": "b"}])
    one_line_error(r"val\.json: annotation id 8 has a bad segmentation: its RLE counts cover 30 pixels",
                   CocoDataset, path, str(tmp_path), train=False)


def test_json_nested_too_deeply_is_a_one_line_error(tmp_path):
    (tmp_path / "deep.json").write_text("[" * 100_000 + "]" * 100_000)
    one_line_error(r"deep\.json: nested too deeply", CocoDataset, str(tmp_path / "deep.json"), str(tmp_path))


def test_num_keypoints_must_count_the_labelled_keypoints(tmp_path):
    # COCOeval ignores a ground truth whose num_keypoints is 0: keypoint AP would read -1 instead of scoring it
    write_image(tmp_path / "1.png", 8, 8)
    ann = {"id": 7, "image_id": 1, "category_id": 5, "bbox": [1, 1, 4, 4], "iscrowd": 0,
           "segmentation": [[1, 1, 5, 1, 5, 5]], "keypoints": [2, 2, 2, 3, 3, 1], "num_keypoints": 0}
    path = write_json(tmp_path / "kp.json", [{"id": 1, "file_name": "1.png", "height": 8, "width": 8}], [ann],
                      categories=[{"id": 5, "name": "b", "keypoints": ["left_a", "right_a"]}])
    one_line_error(r"annotation id 7 has num_keypoints 0, but 2 of its keypoints are labelled", CocoDataset, path,
                   str(tmp_path), keypoint_sigmas=[0.1, 0.1])
