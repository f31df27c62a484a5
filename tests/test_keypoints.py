"""Keypoint R-CNN (Mask R-CNN Sec. 5; Rethinking Fig. 6): head, targets, loss and decoding against torchvision's
KeypointRCNNHeads/Predictor, keypoints_to_heatmap, keypointrcnn_loss and heatmaps_to_keypoints; the flip swap by
hand; reading COCO person-keypoints json; COCOeval keypoints; a tiny model that learns a few real people."""
import json
import os

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.models.detection import keypoint_rcnn as tv_kp
from torchvision.models.detection import roi_heads as tv_roi

import data
import evaluate
from conftest import SHARED_DATA, train_briefly
from keypoints import KeypointHead, heatmaps_to_keypoints, keypoint_loss, keypoint_targets
from model import build_model
from roi_align import multilevel_roi_align
from roi_heads import positive_rois

COCO_SUBSET = os.path.join(SHARED_DATA, "coco_subset")
COCO_KEYPOINTS_SUBSET = os.path.join(SHARED_DATA, "coco_keypoints_subset")
needs_data = pytest.mark.skipif(not os.path.isdir(COCO_SUBSET), reason=f"real data not found at {COCO_SUBSET}")


def test_head_equals_torchvision_keypoint_head_and_predictor():
    torch.manual_seed(0)
    ours = KeypointHead(in_channels=16, num_keypoints=5, num_convs=8, conv_dim=32, norm="none")
    heads, predictor = tv_kp.KeypointRCNNHeads(16, [32] * 8), tv_kp.KeypointRCNNPredictor(32, 5)
    for i in range(8):  # torchvision's Sequential is conv, ReLU, conv, ReLU, ...
        ours.convs[i][0].load_state_dict(heads[2 * i].state_dict())
    ours.deconv.load_state_dict(predictor.kps_score_lowres.state_dict())
    x = torch.randn(3, 16, 14, 14)
    out = ours(x)
    assert out.shape == (3, 5, 56, 56)  # Mask R-CNN Sec. 5: 56x56 heatmaps from 14x14 features
    torch.testing.assert_close(out, predictor(heads(x)))
    gn = KeypointHead(in_channels=16, num_keypoints=5, num_convs=2, conv_dim=32, norm="gn", num_groups=8)
    assert gn(x).shape == (3, 5, 56, 56) and gn.convs[0][0].bias is None  # GN's shift replaces the conv bias


def test_targets_hand_worked_and_equal_torchvision():
    rois = torch.tensor([[10.0, 20.0, 66.0, 76.0]])  # 56 x 56 pixels: one heatmap cell per pixel
    keypoints = torch.tensor([[[10.0, 20.0, 2],    # the top-left corner: cell (0, 0)
                               [66.0, 76.0, 2],    # exactly on the right/bottom border: the last cell (55, 55)
                               [65.9, 20.5, 1],    # hidden but labelled: still a target, cell x = 55, y = 0
                               [9.9, 30.0, 2],     # just left of the RoI: no target
                               [30.0, 40.0, 0],    # not labelled: no target
                               [30.0, 76.5, 2]]])  # below the RoI: no target
    index, valid = keypoint_targets(keypoints, rois, 56)
    assert valid.tolist() == [[True, True, True, False, False, False]]
    assert index.tolist() == [[0, 55 * 56 + 55, 55, 0, 0, 0]]
    ref_index, ref_valid = tv_roi.keypoints_to_heatmap(keypoints, rois, 56)
    assert torch.equal(index, ref_index) and torch.equal(valid.long(), ref_valid)

    torch.manual_seed(0)
    xy = torch.rand(40, 2) * 50
    rois = torch.cat([xy, xy + 5 + torch.rand(40, 2) * 60], dim=1)  # (40, 4)
    keypoints = torch.cat([rois[:, None, :2] - 10 + torch.rand(40, 17, 2) * (rois[:, None, 2:] - rois[:, None, :2]
                                                                              + 20),
                           torch.randint(0, 3, (40, 17, 1)).float()], dim=2)  # (40, 17, 3), some outside
    keypoints[:5, 0, 0] = rois[:5, 2]  # on the border
    index, valid = keypoint_targets(keypoints, rois, 56)
    ref_index, ref_valid = tv_roi.keypoints_to_heatmap(keypoints, rois, 56)
    assert torch.equal(index, ref_index) and torch.equal(valid.long(), ref_valid)
    assert 0 < valid.sum() < valid.numel()


def test_loss_equals_torchvision():
    torch.manual_seed(0)
    proposals = [torch.tensor([[0.0, 0, 40, 60], [10, 10, 50, 30]]), torch.tensor([[5.0, 5, 25, 45]])]
    gt = [torch.cat([torch.rand(3, 4, 2) * 60, torch.randint(0, 3, (3, 4, 1)).float()], dim=2),
          torch.cat([torch.rand(1, 4, 2) * 50, torch.full((1, 4, 1), 2.0)], dim=2)]  # (G, 4, 3) per image
    matched = [torch.tensor([2, 0]), torch.tensor([0])]
    logits = torch.randn(3, 4, 56, 56, requires_grad=True)
    index, valid = zip(*[keypoint_targets(g[m], p, 56) for g, m, p in zip(gt, matched, proposals)])
    ours = keypoint_loss(logits, torch.cat(index), torch.cat(valid))
    torch.testing.assert_close(ours, tv_roi.keypointrcnn_loss(logits, proposals, gt, matched))
    for g in gt:  # nothing visible: zero, and still a graph to every logit (as torchvision)
        g[..., 2] = 0
    index, valid = zip(*[keypoint_targets(g[m], p, 56) for g, m, p in zip(gt, matched, proposals)])
    zero = keypoint_loss(logits, torch.cat(index), torch.cat(valid))
    zero.backward()
    assert zero.item() == 0 and logits.grad is not None


def test_branch_loss_uses_positive_rois_only():
    torch.manual_seed(0)
    head = KeypointHead(in_channels=8, num_keypoints=3, num_convs=1, conv_dim=8, norm="none")
    features = [torch.randn(2, 8, 64 // 2 ** k, 64 // 2 ** k) for k in range(4)]  # P2..P5 of a 256 x 256 batch
    rois = [torch.tensor([[0.0, 0, 100, 100], [20, 30, 90, 200], [5, 5, 50, 60]]), torch.tensor([[10.0, 10, 80, 90]])]
    labels = torch.tensor([1, 0, 1, 1])  # RoI 1 of image 0 is background
    matched = [torch.tensor([1, 0, 0]), torch.tensor([0])]
    targets = [{"keypoints": torch.tensor([[[20.0, 20, 2], [40, 50, 2], [0, 0, 0]],
                                           [[30.0, 30, 2], [60, 90, 1], [70, 70, 2]]])},
               {"keypoints": torch.tensor([[[50.0, 50, 2], [20, 20, 2], [79, 89, 2]]])}]
    positives = positive_rois(rois, labels, matched)  # what RoIHeads hands the branch
    fg_rois = [rois[0][[0, 2]], rois[1]]
    assert all(torch.equal(a, b) for a, b in zip(positives[0], fg_rois, strict=True))
    assert positives[1].tolist() == [1, 1, 1] and [m.tolist() for m in positives[2]] == [[1, 0], [0]]
    ours = head.loss(features, *positives, targets, (256, 256))
    assert set(ours) == {"loss_keypoint"}
    logits = head(multilevel_roi_align(features, fg_rois, (256, 256), 14, 2))
    ref = tv_roi.keypointrcnn_loss(logits, fg_rois, [t["keypoints"] for t in targets],
                                   [torch.tensor([1, 0]), torch.tensor([0])])
    torch.testing.assert_close(ours["loss_keypoint"], ref)
    with pytest.raises(ValueError, match="keypoints"):
        head.loss(features, *positives, [{}, {}], (256, 256))


def test_heatmaps_to_keypoints_hand_worked_and_equal_torchvision():
    maps = torch.full((1, 2, 56, 56), -5.0)
    maps[0, 0, 7, 30] = 9.0  # keypoint 0 peaks at row 7, column 30
    maps[0, 1, 55, 0] = 4.0  # keypoint 1 at the bottom-left cell
    rois = torch.tensor([[100.0, 200.0, 156.0, 256.0]])  # 56 x 56 pixels: the bicubic resize is the identity
    keypoints, scores = heatmaps_to_keypoints(maps, rois)
    assert keypoints.tolist() == [[[130.5, 207.5, 1.0], [100.5, 255.5, 1.0]]]  # pixel centres, + RoI offset
    assert scores.tolist() == [[9.0, 4.0]]

    torch.manual_seed(0)
    maps = torch.randn(7, 17, 56, 56)
    rois = torch.tensor([[3.2, 4.7, 90.1, 60.3], [0.0, 0, 0.5, 0.4], [10, 10, 11.5, 200], [7.5, 8, 300.25, 310],
                         [1, 2, 57, 58], [40, 30, 41, 31], [0, 0, 40.2, 30.3]])  # non-integer sizes (rounding down
    # and up differ for 40.2 x 30.3), thinner than a pixel, large
    keypoints, scores = heatmaps_to_keypoints(maps, rois)
    ref_keypoints, ref_scores = tv_roi.heatmaps_to_keypoints(maps, rois)
    torch.testing.assert_close(keypoints, ref_keypoints)
    torch.testing.assert_close(scores, ref_scores)
    assert heatmaps_to_keypoints(maps[:0], rois[:0])[0].shape == (0, 17, 3)


def test_presets_and_postprocess_rescales_keypoints():
    model = build_model("r50_fpn_gn_kp", num_classes=2)
    head = model.roi_heads.keypoint_head
    assert model.roi_heads.mask_head is None and head.num_keypoints == 17
    assert len(head.convs) == 8 and head.convs[0][0].out_channels == 512  # Mask R-CNN Sec. 5: 8 x conv3x3 512
    assert type(head.convs[0][1]).__name__ == "GroupNorm"  # Rethinking Fig. 6: R50-FPN + GN
    assert build_model("r50_fpn_gn", num_classes=2).roi_heads.keypoint_head is None
    assert build_model("tiny_kp", num_classes=2, num_keypoints=5).roi_heads.keypoint_head.num_keypoints == 5

    det = {"boxes": torch.tensor([[10.0, 20, 30, 40]]), "labels": torch.tensor([1]), "scores": torch.tensor([0.9]),
           "keypoints": torch.tensor([[[10.0, 20, 1], [30, 40, 1]]]), "keypoint_scores": torch.tensor([[3.0, -1]])}
    (out,) = model.postprocess([det], [(100, 200)], [(50, 400)])  # x doubles, y halves
    assert out["keypoints"].tolist() == [[[20.0, 10, 1], [60, 20, 1]]]
    assert out["boxes"].tolist() == [[20.0, 10, 60, 20]]
    assert out["keypoint_scores"].tolist() == [[3.0, -1]]
    assert "masks" not in out


def test_tiny_kp_model_losses_and_outputs():
    torch.manual_seed(0)
    model = build_model("tiny_kp", num_classes=2)
    images = torch.randn(2, 3, 128, 160)
    targets = [{"boxes": torch.tensor([[10.0, 20, 90, 120]]), "labels": torch.tensor([1]),
                "keypoints": torch.cat([torch.rand(1, 17, 2) * 80 + 15, torch.full((1, 17, 1), 2.0)], dim=2)},
               {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64),
                "keypoints": torch.zeros(0, 17, 3)}]  # an image without people
    losses = model.train()(images, [(128, 160), (120, 150)], targets)
    assert "loss_keypoint" in losses and "loss_mask" not in losses and losses["loss_keypoint"].item() > 0
    model.roi_heads.score_thresh, model.roi_heads.detections_per_img = 0.0, 10  # untrained: keep 10 detections
    outputs = model.eval()(images, [(128, 160), (120, 150)], original_sizes=[(256, 320), (60, 75)])
    for out, (h, w) in zip(outputs, [(256, 320), (60, 75)]):
        D = len(out["boxes"])
        assert D > 0 and out["keypoints"].shape == (D, 17, 3) and out["keypoint_scores"].shape == (D, 17)
        x, y = out["keypoints"][..., 0], out["keypoints"][..., 1]  # inside their boxes, in the output size
        boxes = out["boxes"][:, None]
        assert ((x >= boxes[..., 0] - 1e-3) & (x <= boxes[..., 2] + 1e-3)).all()
        assert ((y >= boxes[..., 1] - 1e-3) & (y <= boxes[..., 3] + 1e-3)).all()


def write_keypoints_set(root, keypoints, names=("nose", "left_eye", "right_eye"), size=(10, 20)):
    """One H x W image with one person annotated with `keypoints` (a flat list); returns the json path."""
    Image.fromarray(np.zeros((*size, 3), np.uint8)).save(os.path.join(root, "a.png"))
    ann_file = os.path.join(root, "kp.json")
    with open(ann_file, "w") as f:
        json.dump({"images": [{"id": 1, "file_name": "a.png", "height": size[0], "width": size[1]}],
                   "annotations": [{"id": 7, "image_id": 1, "category_id": 1, "bbox": [1, 1, 15, 8], "iscrowd": 0,
                                    "area": 120, "segmentation": [[1, 1, 16, 1, 16, 9, 1, 9]],
                                    "keypoints": keypoints, "num_keypoints": 2}],
                   "categories": [{"id": 1, "name": "person", "keypoints": list(names)}]}, f)
    return ann_file


def test_flip_mirrors_x_and_swaps_left_and_right(tmp_path):
    # 20 px wide, 10 high, kept at its size (min_size 10): nose at x = 5, left eye at x = 3, right eye unlabelled
    ann_file = write_keypoints_set(str(tmp_path), [5, 4, 2, 3, 2, 2, 0, 0, 0])
    kw = dict(min_size=10, max_size=20, keypoint_sigmas=[0.1, 0.2, 0.3])
    plain = data.CocoDataset(ann_file, str(tmp_path), train=False, **kw)
    flipped = data.CocoDataset(ann_file, str(tmp_path), train=True, flip_prob=1.0, **kw)
    assert plain.num_keypoints == 3 and plain.flip_index == [0, 2, 1] and plain.keypoint_sigmas == [0.1, 0.2, 0.3]
    assert plain[0][1]["keypoints"].tolist() == [[[5, 4, 2], [3, 2, 2], [0, 0, 0]]]
    # after the flip the person's left eye is unlabelled and the right eye is the old left eye at x = 20 - 3
    assert flipped[0][1]["keypoints"].tolist() == [[[15, 4, 2], [0, 0, 0], [17, 2, 2]]]
    assert flipped[0][1]["boxes"].tolist() == [[4, 1, 19, 9]]  # the box flips the same way: x1' = 20 - x2


@pytest.mark.parametrize("keypoints", [[5, 4, 2, 3, 2], [5, 4, 2, 3, 2, 3, 0, 0, 0], [5, 4, 2, "a", 2, 2, 0, 0, 0],
                                       [5, float("nan"), 2, 3, 2, 2, 0, 0, 0], None])
def test_bad_keypoints_name_the_annotation(tmp_path, keypoints):
    ann_file = write_keypoints_set(str(tmp_path), keypoints)
    with pytest.raises(data.DataError, match="annotation id 7 has bad keypoints"):
        data.CocoDataset(ann_file, str(tmp_path), keypoint_sigmas=[0.1, 0.2, 0.3])


def test_num_keypoints_filled_for_cocoeval(tmp_path):
    # COCOeval reads each annotation's num_keypoints; a json without it gets COCO's meaning, the labelled (v > 0) ones.
    ann_file = write_keypoints_set(str(tmp_path), [5, 4, 2, 3, 2, 1, 0, 0, 0])
    with open(ann_file) as f:
        raw = json.load(f)
    del raw["annotations"][0]["num_keypoints"]
    with open(ann_file, "w") as f:
        json.dump(raw, f)
    assert data.CocoDataset(ann_file, str(tmp_path), keypoint_sigmas=[0.1, 0.2, 0.3]).coco.anns[7]["num_keypoints"] == 2


def test_keypoint_sigmas_required_for_non_coco_keypoints(tmp_path):
    ann_file = write_keypoints_set(str(tmp_path), [5, 4, 2, 3, 2, 2, 0, 0, 0])
    with pytest.raises(data.DataError, match="kp.json: 3 keypoints.*--keypoint-sigmas"):
        data.CocoDataset(ann_file, str(tmp_path))
    with pytest.raises(data.DataError, match=r"keypoint OKS sigmas \[0.1, 0.2\] for 3 keypoints: expected one"):
        data.CocoDataset(ann_file, str(tmp_path), keypoint_sigmas=[0.1, 0.2])


@pytest.mark.parametrize("skeleton, expected", [(None, []), ([[1, 2], [1, 3]], [[0, 1], [0, 2]]),
                                               ([[1, 4]], "skeleton"), ([[1, 2, 3]], "skeleton"),
                                               ([[1, True]], "skeleton"), ("1-2", "skeleton")])
def test_the_skeleton_is_kept_0_based_or_refused_naming_the_json(tmp_path, skeleton, expected):
    """COCO's person category lists its limbs as 1-based keypoint pairs; predict.py draws them (draw.py)."""
    ann_file = write_keypoints_set(str(tmp_path), [5, 4, 2, 3, 2, 2, 0, 0, 0])
    if skeleton is not None:
        with open(ann_file) as f:
            raw = json.load(f)
        raw["categories"][0]["skeleton"] = skeleton
        with open(ann_file, "w") as f:
            json.dump(raw, f)
    if expected == "skeleton":
        with pytest.raises(data.DataError, match=r"kp\.json: category id 1 has skeleton .*: expected pairs \[j1, j2\] "
                                                 r"of keypoint numbers 1\.\.3"):
            data.CocoDataset(ann_file, str(tmp_path), keypoint_sigmas=[0.1, 0.2, 0.3])
    else:
        assert data.CocoDataset(ann_file, str(tmp_path), keypoint_sigmas=[0.1, 0.2, 0.3]).keypoint_skeleton == expected


@needs_data
@pytest.mark.parametrize("root,split", [(COCO_SUBSET, "train2017"), (COCO_SUBSET, "val2017"),
                                        (COCO_KEYPOINTS_SUBSET, "train2017"), (COCO_KEYPOINTS_SUBSET, "val2017")])
def test_reads_coco_person_keypoints(root, split):
    ann_file = os.path.join(root, "annotations", f"person_keypoints_{split}.json")
    dataset = data.CocoDataset(ann_file, os.path.join(root, split), min_size=200, max_size=400)
    with open(ann_file) as f:
        raw = json.load(f)
    assert dataset.num_keypoints == 17 and dataset.keypoint_sigmas == list(data.COCO_KEYPOINT_SIGMAS)
    names = raw["categories"][0]["keypoints"]
    assert [names[j] for j in dataset.flip_index][1:5] == ["right_eye", "left_eye", "right_ear", "left_ear"]
    assert len(dataset.keypoint_skeleton) == 19 and dataset.keypoint_skeleton[0] == [15, 13]  # left ankle-knee
    anns = {}
    for ann in raw["annotations"]:
        anns.setdefault(ann["image_id"], []).append(ann)
    index = max(range(len(dataset)), key=lambda i: len(anns.get(dataset.image_ids[i], [])))  # most people
    image, target = dataset[index]
    kept = [a for a in anns[dataset.image_ids[index]] if not a["iscrowd"] and a["bbox"][2] > 0 and a["bbox"][3] > 0]
    (h0, w0), (h, w) = target["orig_size"], target["size"]
    expected = torch.tensor([a["keypoints"] for a in kept], dtype=torch.float32).reshape(-1, 17, 3)
    expected[..., 0] *= w / w0
    expected[..., 1] *= h / h0
    assert target["keypoints"].shape == (len(kept), 17, 3) == (len(target["boxes"]), 17, 3)
    torch.testing.assert_close(target["keypoints"], expected)

    flipped = data.CocoDataset(ann_file, os.path.join(root, split), train=True, flip_prob=1.0, min_size=200,
                               max_size=400)[index][1]["keypoints"]
    labelled = expected[..., 2] > 0
    assert torch.equal(flipped[:, dataset.flip_index][..., 2], expected[..., 2])
    torch.testing.assert_close(flipped[:, dataset.flip_index][..., 0][labelled], w - expected[..., 0][labelled])


@needs_data
def test_datasets_without_keypoints_are_unchanged():
    dataset = data.CocoDataset(os.path.join(COCO_SUBSET, "annotations", "instances_val2017.json"),
                               os.path.join(COCO_SUBSET, "val2017"), min_size=100, max_size=200)
    assert dataset.num_keypoints == 0 and dataset.keypoint_sigmas is None
    assert set(dataset[1][1]) == {"boxes", "labels", "masks", "image_id", "orig_size", "size"}


@needs_data
def test_coco_eval_keypoints_of_ground_truth_and_sigmas():
    ann_file = os.path.join(COCO_KEYPOINTS_SUBSET, "annotations", "person_keypoints_val2017.json")
    dataset = data.CocoDataset(ann_file, os.path.join(COCO_KEYPOINTS_SUBSET, "val2017"))
    people = [a for a in dataset.coco.dataset["annotations"] if a["num_keypoints"] > 0 and not a["iscrowd"]]
    out = {}  # model-style outputs per image: the ground truth itself, keypoints as (x, y, 1)
    for a in people:
        o = out.setdefault(a["image_id"], {"boxes": [], "scores": [], "labels": [], "keypoints": []})
        o["boxes"].append([a["bbox"][0], a["bbox"][1], a["bbox"][0] + a["bbox"][2], a["bbox"][1] + a["bbox"][3]])
        o["scores"].append(1.0)
        o["labels"].append(1)
        o["keypoints"].append(torch.tensor(a["keypoints"], dtype=torch.float32).reshape(17, 3))

    def results(shift):
        rs = []
        for image_id, o in out.items():
            kps = torch.stack(o["keypoints"]) + torch.tensor([shift, 0.0, 0.0])
            kps[..., 2] = 1
            rs += evaluate.to_coco_results({"boxes": torch.tensor(o["boxes"]), "scores": torch.tensor(o["scores"]),
                                            "labels": torch.tensor(o["labels"]), "keypoints": kps}, image_id,
                                           dataset.cat_ids)
        return rs

    exact = results(0.0)
    assert len(exact[0]["keypoints"]) == 51 and exact[0]["keypoints"][2] == 1  # flat (x, y, v) x 17
    metrics = evaluate.coco_eval(dataset.coco, exact, ("keypoints",), keypoint_sigmas=dataset.keypoint_sigmas)
    assert metrics["keypoints/AP"] == pytest.approx(1.0)
    assert set(evaluate.KEYPOINT_METRICS) == {k.split("/")[1] for k in metrics if k.startswith("keypoints/")}
    # every keypoint 8 px off: OKS falls; with 10x wider sigmas the same error costs much less
    coco_sigmas = evaluate.coco_eval(dataset.coco, results(8.0), ("keypoints",),
                                     keypoint_sigmas=dataset.keypoint_sigmas)["keypoints/AP"]
    wide = evaluate.coco_eval(dataset.coco, results(8.0), ("keypoints",),
                              keypoint_sigmas=[10 * s for s in dataset.keypoint_sigmas])["keypoints/AP"]
    assert coco_sigmas < 0.8 and wide > coco_sigmas + 0.1


OVERFIT_IMAGES = [574769, 515289, 318219, 483108]  # coco_subset train2017: 7 large people with 11..17 keypoints


@needs_data
def test_tiny_keypoint_model_learns_a_few_people_on_cpu(tmp_path):
    """Keypoint R-CNN learns: tiny_kp, trained from scratch on 4 person images, finds their keypoints there.
    Untrained it scores keypoint AP 0.0; after 200 iterations it reached 0.72-0.76 (AP50 1.0) when this was written."""
    with open(os.path.join(COCO_SUBSET, "annotations", "person_keypoints_train2017.json")) as f:
        raw = json.load(f)
    raw["images"] = [i for i in raw["images"] if i["id"] in OVERFIT_IMAGES]
    raw["annotations"] = [a for a in raw["annotations"] if a["image_id"] in OVERFIT_IMAGES]
    ann_file = tmp_path / "people.json"
    ann_file.write_text(json.dumps(raw))
    kw = dict(min_size=192, max_size=320)
    train_set = data.CocoDataset(str(ann_file), os.path.join(COCO_SUBSET, "train2017"), train=True, **kw)
    eval_set = data.CocoDataset(str(ann_file), os.path.join(COCO_SUBSET, "train2017"), train=False, **kw)

    torch.manual_seed(0)
    model = build_model("tiny_kp", num_classes=train_set.num_classes, num_keypoints=train_set.num_keypoints)
    before = evaluate.evaluate(model, eval_set, torch.device("cpu"), workers=0)
    losses = train_briefly(model, train_set, iters=200, lr_step=160)

    metrics = evaluate.evaluate(model, eval_set, torch.device("cpu"), workers=0)
    print(f"keypoint AP before {before['keypoints/AP']:.3f}, after {metrics['keypoints/AP']:.3f}, "
          f"AP50 {metrics['keypoints/AP50']:.3f}; "
          f"box AP {metrics['bbox/AP']:.3f}; loss_keypoint {losses['loss_keypoint'].item():.3f}")
    assert "segm/AP" not in metrics  # no mask head in tiny_kp
    assert before["keypoints/AP"] < 0.1
    assert metrics["keypoints/AP"] >= 0.5
