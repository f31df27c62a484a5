"""COCO results format and COCOeval wiring, on hand-made ground truth whose answers can be read off."""
import numpy as np
import pytest
import pycocotools.mask as mask_util
import torch
from pycocotools.coco import COCO

import evaluate


def make_coco_gt():
    """Two 40x60 images; image 1 has a category-7 square, image 2 a category-3 rectangle (original COCO ids)."""
    gt = COCO()
    gt.dataset = {
        "images": [{"id": 1, "height": 40, "width": 60, "file_name": "a.png"},
                   {"id": 2, "height": 40, "width": 60, "file_name": "b.png"}],
        "categories": [{"id": 3, "name": "three"}, {"id": 7, "name": "seven"}],
        "annotations": [
            {"id": 1, "image_id": 1, "category_id": 7, "bbox": [10, 5, 20, 20], "area": 400, "iscrowd": 0,
             "segmentation": [[10, 5, 30, 5, 30, 25, 10, 25]]},
            {"id": 2, "image_id": 2, "category_id": 3, "bbox": [20, 10, 30, 20], "area": 600, "iscrowd": 0,
             "segmentation": [[20, 10, 50, 10, 50, 30, 20, 30]]},
        ]}
    gt.createIndex()
    return gt


def box_mask(h, w, x1, y1, x2, y2):
    m = torch.zeros(1, h, w)
    m[0, y1:y2, x1:x2] = 1.0
    return m


def test_results_use_xywh_original_ids_and_rle():
    # soft mask: 0.8 inside the box, 0.3 around it; Mask R-CNN Sec. 3.1 binarizes at 0.5
    out = {"boxes": torch.tensor([[10.0, 20.0, 30.0, 60.0]]), "scores": torch.tensor([0.9]),
           "labels": torch.tensor([2]), "masks": (box_mask(64, 48, 10, 20, 30, 60) * 0.5 + 0.3)[None]}
    (r,) = evaluate.to_coco_results(out, image_id=5, cat_ids=[3, 7])
    assert r["bbox"] == [10.0, 20.0, 20.0, 40.0]
    assert r["category_id"] == 7 and r["image_id"] == 5 and r["score"] == np.float32(0.9).item()
    decoded = mask_util.decode(r["segmentation"])
    assert decoded.shape == (64, 48) and decoded.sum() == 20 * 40 and decoded[20:60, 10:30].all()


def test_perfect_predictions_score_ap_one():
    gt = make_coco_gt()
    # Contiguous labels: 1 <-> id 3, 2 <-> id 7. Soft masks at 0.9 pass the 0.5 threshold.
    outs = {1: {"boxes": torch.tensor([[10.0, 5.0, 30.0, 25.0]]), "scores": torch.tensor([0.99]),
                "labels": torch.tensor([2]), "masks": 0.9 * box_mask(40, 60, 10, 5, 30, 25)[None]},
            2: {"boxes": torch.tensor([[20.0, 10.0, 50.0, 30.0]]), "scores": torch.tensor([0.98]),
                "labels": torch.tensor([1]), "masks": 0.9 * box_mask(40, 60, 20, 10, 50, 30)[None]}}
    results = [r for i, o in outs.items() for r in evaluate.to_coco_results(o, i, cat_ids=[3, 7])]
    metrics = evaluate.coco_eval(gt, results)
    assert metrics["bbox/AP"] == pytest.approx(1.0) and metrics["segm/AP"] == pytest.approx(1.0)
    assert set(metrics) == {f"{t}/{m}" for t in ("bbox", "segm") for m in evaluate.METRICS}


def test_image_ids_restrict_the_evaluation_to_those_images():
    # Image 1 detected perfectly, image 2 not at all: AP 1 over image 1 alone, about half over both.
    out = {"boxes": torch.tensor([[10.0, 5.0, 30.0, 25.0]]), "scores": torch.tensor([0.99]),
           "labels": torch.tensor([2]), "masks": 0.9 * box_mask(40, 60, 10, 5, 30, 25)[None]}
    results = evaluate.to_coco_results(out, 1, cat_ids=[3, 7])
    assert evaluate.coco_eval(make_coco_gt(), results, image_ids=[1])["bbox/AP"] == pytest.approx(1.0)
    assert evaluate.coco_eval(make_coco_gt(), results)["bbox/AP"] == pytest.approx(0.5)  # category 3: AP 0


def test_wrong_category_scores_zero():
    gt = make_coco_gt()
    out = {"boxes": torch.tensor([[10.0, 5.0, 30.0, 25.0]]), "scores": torch.tensor([0.99]),
           "labels": torch.tensor([1]), "masks": 0.9 * box_mask(40, 60, 10, 5, 30, 25)[None]}
    metrics = evaluate.coco_eval(gt, evaluate.to_coco_results(out, 1, cat_ids=[3, 7]))
    assert metrics["bbox/AP"] == 0.0


def test_no_detections_scores_zero():
    metrics = evaluate.coco_eval(make_coco_gt(), [])
    assert metrics["bbox/AP"] == 0.0 and metrics["segm/AR100"] == 0.0


def test_a_keypoint_model_on_a_json_without_keypoints_is_refused_before_inference(tmp_path):
    # COCOeval would fail after the whole inference (KeyError 'num_keypoints'); the check comes first
    from shapes import make_shapes
    make_shapes(str(tmp_path), num_train=2, num_val=2, seed=0)
    ann, images = str(tmp_path / "annotations" / "instances_val.json"), str(tmp_path / "val")
    args = {"preset": "tiny_kp", "norm": None, "data": "custom", "min_size": 96, "max_size": 1333, "val_ann": ann,
            "val_images": images}
    torch.save({"model": {}, "args": args}, tmp_path / "model_0000001.pth")
    with pytest.raises(SystemExit, match=r"error: preset tiny_kp predicts keypoints, but .*instances_val\.json "
                                         r"names none; evaluate it on a COCO person-keypoints json"):
        evaluate.main(["--checkpoint", str(tmp_path / "model_0000001.pth"), "--device", "cpu"])


def test_a_checkpoint_naming_an_unknown_preset_or_norm_is_a_one_line_error(tmp_path):
    args = {"preset": "no_such_preset", "norm": "weird", "data": "shapes", "min_size": 96, "max_size": 1333,
            "val_ann": None, "val_images": None}
    torch.save({"model": {}, "args": args}, tmp_path / "model_0000001.pth")
    with pytest.raises(SystemExit, match=r"names preset 'no_such_preset' and norm 'weird'; this code knows the "
                                         r"presets r50_fpn_gn, .* and the norms gn, syncbn"):
        evaluate.main(["--checkpoint", str(tmp_path / "model_0000001.pth"), "--device", "cpu"])


def test_a_json_of_other_classes_than_the_checkpoints_is_refused(tmp_path):
    # the model's labels stand for the training json's categories; another json would report them as other classes
    import json
    import train
    from shapes import make_shapes
    make_shapes(str(tmp_path), num_train=2, num_val=2, seed=0)
    ann = tmp_path / "annotations"
    train.main(["--train-ann", str(ann / "instances_train.json"), "--train-images", str(tmp_path / "train"),
                "--val-ann", str(ann / "instances_val.json"), "--val-images", str(tmp_path / "val"), "--data", "custom",
                "--preset", "tiny", "--device", "cpu", "--batch-size", "2", "--min-size", "64", "--workers", "0",
                "--max-iters", "1", "--no-eval", "--output-dir", str(tmp_path / "run")])
    val = json.loads((ann / "instances_val.json").read_text())
    permute = {1: 7, 3: 1, 7: 3}  # the same three ids, standing for other names
    val["categories"] = [dict(c, id=permute[c["id"]]) for c in val["categories"]]
    val["annotations"] = [dict(a, category_id=permute[a["category_id"]]) for a in val["annotations"]]
    (tmp_path / "permuted.json").write_text(json.dumps(val))
    with pytest.raises(SystemExit, match=r"model_0000001\.pth was trained on the classes \[\[1, 'circle'\], \[3, "
                                         r"'square'\], \[7, 'triangle'\]\], but .*permuted\.json has"):
        evaluate.main(["--checkpoint", str(tmp_path / "run" / "model_0000001.pth"), "--device", "cpu",
                       "--val-ann", str(tmp_path / "permuted.json"), "--val-images", str(tmp_path / "val")])


@pytest.mark.parametrize("sizes", [(-5, 1333), ("96", 1333), (96, float("nan"))])
def test_a_checkpoint_with_sizes_train_py_does_not_write_is_refused(tmp_path, sizes):
    args = {"preset": "tiny", "norm": None, "data": "shapes", "min_size": sizes[0], "max_size": sizes[1],
            "val_ann": None, "val_images": None}
    torch.save({"model": {}, "args": args}, tmp_path / "model_0000001.pth")
    with pytest.raises(SystemExit, match=r"model_0000001\.pth has min_size .* not train.py's"):
        evaluate.main(["--checkpoint", str(tmp_path / "model_0000001.pth"), "--device", "cpu"])
