"""Test-time augmentation (tta.py): box mapping under scale and flip, merging, mask averaging, and the evaluate.py CLI.

A hand-built detector that finds the one bright rectangle of an image is flip- and scale-equivariant by construction,
so every augmentation must give back the same box in the original image; the real tiny model, with one scale equal to
the test size and no flip, must give exactly what plain inference gives.
"""
import json
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
import torchvision

import data
import evaluate
import fast_ops
import train
import tta
from masks import paste_masks
from model import build_model
from shapes import make_shapes


class RectangleDetector:
    """Finds the tight box of the pixels of channel 0 above 0 (one per image, class 1, score 0.9); its "mask" is that
    channel cropped to the box and average-pooled to 4 x 4. Records the boxes it saw, in each view's pixels.
    It has only what tta.detect may use of a MaskRCNN: boxes alone (detect_boxes), then the masks of the merged
    boxes (mask_probs); it cannot be called for full outputs."""

    plain_ops = False

    def __init__(self):
        self.roi_heads = SimpleNamespace(nms_thresh=0.5, detections_per_img=100, mask_head=object(),
                                         keypoint_head=None)
        self.detected, self.mask_boxes = [], []

    def detect_boxes(self, images, image_sizes, original_sizes=None):
        outputs = []
        for image, (h, w), (out_h, out_w) in zip(images, image_sizes, original_sizes):
            ys, xs = torch.where(image[0, :h, :w] > 0)
            if len(xs) == 0:
                boxes = torch.zeros(0, 4)
            else:
                boxes = torch.tensor([[xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]], dtype=torch.float32)
            self.detected.append(boxes)
            outputs.append({"boxes": boxes * torch.tensor([out_w / w, out_h / h, out_w / w, out_h / h]),
                            "scores": torch.full((len(boxes),), 0.9),
                            "labels": torch.ones(len(boxes), dtype=torch.int64)})
        return outputs

    def mask_probs(self, images, image_sizes, boxes, labels):
        self.mask_boxes.extend(boxes)
        probs = []
        for image, b in zip(images, boxes):
            crops = [image[0, int(y1):int(y2), int(x1):int(x2)] for x1, y1, x2, y2 in b.tolist()]
            probs.append(torch.stack([F.adaptive_avg_pool2d(c[None], 4) for c in crops]) if crops
                         else torch.zeros(0, 1, 4, 4))
        return probs


def rectangle_view(scale=1):
    """An 8 x 12 normalized image, background -1, a rectangle at x 1..5, y 2..6 whose values rise left to right
    (so a mask that is not mirrored back is visibly wrong); scale > 1 enlarges it by pixel repetition."""
    view = -torch.ones(3, 8, 12)
    view[0, 2:6, 1:5] = torch.tensor([1.0, 2.0, 3.0, 4.0])
    return view.repeat_interleave(scale, dim=1).repeat_interleave(scale, dim=2)


@pytest.mark.parametrize("plain_ops", [False, True])
def test_flip_and_scale_map_back_to_the_original_box(plain_ops):
    detector = RectangleDetector()
    detector.plain_ops = plain_ops  # the masks are pasted as the model pastes them: masks.paste_masks or fast_ops'
    out = tta.detect(detector, [rectangle_view(1), rectangle_view(2)], original_size=(8, 12), flip=True)
    # What the detector saw, per view (12 and 24 px wide): the mirrored rectangle spans x 12-5..12-1 and 24-10..24-2.
    assert [b.tolist() for b in detector.detected] == [[[1, 2, 5, 6]], [[7, 2, 11, 6]], [[2, 4, 10, 12]],
                                                       [[14, 4, 22, 12]]]
    # All four map back to one box; the duplicates collapse under NMS.
    assert out["boxes"].tolist() == [[1, 2, 5, 6]] and out["scores"].tolist() == [pytest.approx(0.9)]
    assert out["labels"].tolist() == [1]
    # The merged box goes back into every view for the masks, mirrored for the mirrored views.
    assert [b.tolist() for b in detector.mask_boxes] == [b.tolist() for b in detector.detected]
    # Every view's mask, mirrored back, is the rectangle's left-to-right ramp; the average is that ramp.
    ramp = torch.tensor([1.0, 2.0, 3.0, 4.0]).expand(4, 4)[None, None]
    paste = paste_masks if plain_ops else fast_ops.paste_masks
    assert torch.equal(out["masks"], paste(ramp, out["boxes"], (8, 12)))


class MirrorPreferringDetector(RectangleDetector):
    """RectangleDetector that scores 0.95 where the rectangle's ramp falls left to right, i.e. in mirrored views."""

    def detect_boxes(self, images, image_sizes, original_sizes=None):
        outputs = super().detect_boxes(images, image_sizes, original_sizes)
        for image, boxes, out in zip(images, self.detected[-len(images):], outputs):
            for i, (x1, y1, x2, _) in enumerate(boxes.int().tolist()):
                if image[0, y1, x1] > image[0, y1, x2 - 1]:
                    out["scores"][i] = 0.95
        return outputs


def test_the_mirrored_views_box_maps_back_exactly():
    # As above, but the mirrored views now win NMS: the merged box is a mirrored view's box mirrored back,
    # x -> 12 - x of [7, 2, 11, 6] (or of [14, 4, 22, 12] / 2), the original [1, 2, 5, 6] again.
    detector = MirrorPreferringDetector()
    out = tta.detect(detector, [rectangle_view(1), rectangle_view(2)], original_size=(8, 12), flip=True)
    assert out["scores"].tolist() == [pytest.approx(0.95)] and out["labels"].tolist() == [1]
    assert out["boxes"].tolist() == [[1, 2, 5, 6]]


def test_nothing_detected_gives_empty_outputs():
    out = tta.detect(RectangleDetector(), [-torch.ones(3, 8, 12)], original_size=(8, 12), flip=True)
    assert out["boxes"].shape == (0, 4) and out["scores"].shape == (0,) and out["masks"].shape == (0, 1, 8, 12)


def test_flip_boxes_is_its_own_inverse():
    boxes = torch.tensor([[1.0, 2.0, 5.0, 6.0], [0.0, 0.0, 12.0, 8.0]])
    assert tta.flip_boxes(boxes, 12).tolist() == [[7, 2, 11, 6], [0, 0, 12, 8]]
    assert torch.equal(tta.flip_boxes(tta.flip_boxes(boxes, 12), 12), boxes)


def test_merge_is_nms_per_class_over_all_augmentations():
    # Augmentation A, then augmentation B (already mapped to the original image).
    boxes = torch.tensor([[0, 0, 10, 10], [0, 0, 10, 10],          # A: class 1 (0.9), class 2 (0.8)
                          [1, 0, 11, 10], [20, 20, 30, 30], [0, 1, 10, 11]], dtype=torch.float32)  # B
    scores = torch.tensor([0.9, 0.8, 0.7, 0.6, 0.85])
    labels = torch.tensor([1, 2, 1, 1, 2])
    # IoU([0,0,10,10], [1,0,11,10]) = 90 / 110 > 0.5: B's class-1 copy goes; in class 2, B's 0.85 beats A's 0.8;
    # the identical boxes of classes 1 and 2 do not suppress each other; the far box stays.
    b, s, l = tta.merge_detections(boxes, scores, labels, nms_thresh=0.5, detections_per_img=100)
    assert b.tolist() == [[0, 0, 10, 10], [0, 1, 10, 11], [20, 20, 30, 30]]
    assert s.tolist() == pytest.approx([0.9, 0.85, 0.6]) and l.tolist() == [1, 2, 1]
    b, s, l = tta.merge_detections(boxes, scores, labels, nms_thresh=0.5, detections_per_img=2)
    assert s.tolist() == pytest.approx([0.9, 0.85])
    # A looser threshold keeps B's shifted class-1 copy (IoU 0.82 <= 0.9).
    assert tta.merge_detections(boxes, scores, labels, nms_thresh=0.9)[1].tolist() == pytest.approx(
        [0.9, 0.85, 0.8, 0.7, 0.6])


@pytest.mark.parametrize("plain_ops", [False, True])
def test_merge_matches_torchvision_batched_nms(plain_ops):
    g = torch.Generator().manual_seed(0)
    xy = torch.rand(300, 2, generator=g) * 50
    boxes = torch.cat([xy, xy + 5 + torch.rand(300, 2, generator=g) * 20], dim=1)
    scores, labels = torch.rand(300, generator=g), torch.randint(1, 4, (300,), generator=g)
    keep = torchvision.ops.batched_nms(boxes, scores, labels, 0.5)[:100]
    b, s, l = tta.merge_detections(boxes, scores, labels, nms_thresh=0.5, detections_per_img=100, plain_ops=plain_ops)
    assert torch.equal(b, boxes[keep]) and torch.equal(s, scores[keep]) and torch.equal(l, labels[keep])


def test_mask_average_mirrors_flipped_views_back():
    plain = torch.tensor([[0.2, 0.4], [0.6, 0.8]])[None, None]
    mirrored = torch.tensor([[0.3, 0.1], [0.9, 0.5]])[None, None]  # this view's image was mirrored
    mean = tta.average_masks([plain, mirrored], [False, True])
    expected = torch.tensor([[0.15, 0.35], [0.55, 0.85]])  # (0.2 + 0.1) / 2, (0.4 + 0.3) / 2, ...
    assert mean.shape == (1, 1, 2, 2) and torch.allclose(mean[0, 0], expected)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A tiny model trained for a few iterations on a small shapes set, in a temporary working directory."""
    root = tmp_path_factory.mktemp("tta")
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(root)  # anything written to the working directory (data_cache/, runs/) stays in tmp
        make_shapes("shapes", num_train=4, num_val=2, seed=0)
        train.main(["--train-ann", "shapes/annotations/instances_train.json", "--train-images", "shapes/train",
                    "--val-ann", "shapes/annotations/instances_val.json", "--val-images", "shapes/val",
                    "--data", "custom", "--preset", "tiny", "--device", "cpu", "--batch-size", "2",
                    "--min-size", "64", "--max-iters", "2", "--warmup-iters", "1", "--workers", "0", "--no-eval",
                    "--output-dir", "run"])
        yield root


def plain_outputs(model, dataset):
    outputs = []
    with torch.no_grad():
        for i in range(len(dataset)):
            images, sizes, targets = data.collate([dataset[i]])
            outputs.append(model(images, sizes, original_sizes=[targets[0]["orig_size"]])[0])
    return outputs


def test_one_scale_without_flip_equals_plain_inference(run):
    # The shapes images are 128 x 160: at min_size 128 the test scale is the original size.
    model, dataset = evaluate.load_run(str(run / "run" / "model_0000002.pth"), min_size=128)
    model.eval()
    plain = plain_outputs(model, dataset)
    augmented = [out for out, _ in tta.predict(model, dataset, torch.device("cpu"), scales=(), flip=False,
                                               workers=0)]
    assert sum(len(p["boxes"]) for p in plain) > 0
    for p, a in zip(plain, augmented, strict=True):
        assert set(a) == set(p)
        for key in p:
            assert torch.equal(a[key], p[key]), key


def test_evaluate_cli_with_tta(run, monkeypatch, capsys):
    monkeypatch.chdir(run)
    flags = ["--checkpoint", "run/model_0000002.pth", "--device", "cpu", "--workers", "0"]
    with pytest.raises(SystemExit, match="the test scale .* is always a view"):  # 64 is the checkpoint's test size
        evaluate.main(flags + ["--tta-scales", "64"])
    capsys.readouterr()
    metrics = evaluate.main(flags + ["--tta-scales", "48,96", "--tta-flip", "--results", "tta.json"])
    assert "Average Precision  (AP) @[ IoU=0.50:0.95" in capsys.readouterr().out
    assert set(metrics) == {f"{t}/{m}" for t in ("bbox", "segm") for m in evaluate.METRICS}
    assert all(0 <= v <= 1 or v == -1 for v in metrics.values())  # -1: COCOeval's "no object of that size"
    with open("tta.json") as f:
        results = json.load(f)
    assert results and all("segmentation" in r for r in results)
    assert {r["image_id"] for r in results} <= {1, 2}


def test_views_are_the_test_scale_and_the_added_scales_with_their_own_cap(run):
    # Detectron: the test scale keeps TEST.MAX_SIZE, the added scales TEST.BBOX_AUG.MAX_SIZE. The 128 x 160 shapes
    # image at min_size 128 capped at 150 is 120 x 150; the added 128 under the cap 2000 is 128 x 160, 256 is 256 x 320.
    _, dataset = evaluate.load_run(str(run / "run" / "model_0000002.pth"), min_size=128, max_size=150)
    views = tta.ScaledViews(dataset, scales=(128, 256), max_size=2000)[0]
    assert [tuple(image.shape[1:]) for image, _ in views] == [(120, 150), (128, 160), (256, 320)]
    assert views[0][1]["size"] == (120, 150) and all(t["image_id"] == views[0][1]["image_id"] for _, t in views)


@pytest.mark.parametrize("text", ["4a0", "400,-1", ""])
def test_bad_tta_scales_is_a_one_line_error(text, capsys):
    with pytest.raises(SystemExit):
        evaluate.main(["--checkpoint", "unused.pth", "--tta-scales", text])
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "error: argument --tta-scales: expected comma-separated positive shorter sides" in err


@pytest.mark.parametrize("preset", ["tiny", "tiny_kp"])
def test_cascade_and_keypoint_models_under_tta(preset):
    """The cascade merges with its last stage's NMS settings; keypoint models are refused (only boxes and masks
    are merged)."""
    torch.manual_seed(0)
    cascade = preset == "tiny"
    model = build_model(preset, num_classes=4, cascade=cascade).eval()
    view = torch.randn(3, 64, 96)
    if cascade:
        out = tta.detect(model, [view, torch.randn(3, 96, 144)], (64, 96), flip=True)
        assert model.roi_heads.detections_per_img == model.roi_heads.stages[-1].detections_per_img
        assert len(out["boxes"]) <= model.roi_heads.detections_per_img
        assert out["masks"].shape[1:] == (1, 64, 96) and len(out["masks"]) == len(out["boxes"])
    else:
        with pytest.raises(ValueError, match="keypoint models"):
            tta.detect(model, [view], (64, 96))
