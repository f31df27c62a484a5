"""cascade.py: the stages' IoU thresholds and coders by hand, class-agnostic refinement, the averaged scores, a training
step that reaches all three stages, inference, and a Mask R-CNN checkpoint loaded into a cascade."""
import math

import pytest
import torch

import evaluate
import checkpoint
import train
from boxes import box_iou
from cascade import CascadeRoIHeads, cascade_state_dict, scale_gradient
from masks import MaskHead
from model import build_model
from roi_align import multilevel_roi_align
from roi_heads import BoxHead, RoIHeads, fast_rcnn_loss
from shapes import make_shapes

C, K, REP = 8, 3, 32                          # feature channels, classes incl. background, box feature size
IMAGE_SHAPE, IMAGE_SIZES = (64, 128), [(64, 128), (60, 100)]


def thin_cascade(mask=True):
    heads = [BoxHead(in_channels=C, num_convs=1, conv_dim=16, fc_dim=REP, norm="gn", num_groups=4) for _ in range(3)]
    mask_head = MaskHead(in_channels=C, num_convs=1, conv_dim=16, norm="gn", num_groups=4, num_classes=K)
    return CascadeRoIHeads(heads, K, mask_head if mask else None)


def features(seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(2, C, 16, 32, generator=g), torch.randn(2, C, 8, 16, generator=g)]  # strides 4 and 8


def targets():
    masks = torch.zeros(2, 64, 128, dtype=torch.uint8)
    masks[0, 10:40, 20:60] = 1
    masks[1, 20:50, 70:120] = 1
    empty = {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64),
             "masks": torch.zeros(0, 64, 128, dtype=torch.uint8)}
    return [{"boxes": torch.tensor([[20.0, 10.0, 60.0, 40.0], [70.0, 20.0, 120.0, 50.0]]),
             "labels": torch.tensor([1, 2]), "masks": masks}, empty]


def test_stages_have_rising_iou_thresholds_and_growing_coder_weights():
    heads = thin_cascade()
    assert [(s.matcher.low_threshold, s.matcher.high_threshold) for s in heads.stages] == [(0.5, 0.5), (0.6, 0.6),
                                                                                          (0.7, 0.7)]
    assert [s.box_coder.weights for s in heads.stages] == [(10, 10, 5, 5), (20, 20, 10, 10), (30, 30, 15, 15)]
    assert [s.box_predictor.bbox_pred.out_features for s in heads.stages] == [4, 4, 4]   # class-agnostic
    assert heads.mask_head is not None and heads.keypoint_head is None  # the cascade's own mask head
    assert [s.mask_head for s in heads.stages] == [None, None, None]
    assert (heads.nms_thresh, heads.detections_per_img) == (heads.stages[-1].nms_thresh,
                                                            heads.stages[-1].detections_per_img)


def test_each_stage_labels_and_encodes_with_its_own_threshold_and_weights():
    # RoIs [0, 0, 100, L] overlap the GT [0, 0, 100, 100] with IoU L / 100 = 0.55, 0.65, 0.75
    heads = thin_cascade()
    gt = {"boxes": torch.tensor([[0.0, 0.0, 100.0, 100.0]]), "labels": torch.tensor([2])}
    rois = [torch.tensor([[0.0, 0.0, 100.0, 55.0], [0.0, 0.0, 100.0, 65.0], [0.0, 0.0, 100.0, 75.0]])]
    fg = []
    for stage in heads.stages:
        torch.manual_seed(0)
        sampled, labels, _, targets_ = stage.sample_rois(rois, [gt])
        assert sampled[0].shape == (4, 4)   # the three RoIs and the GT box added to them, in that order
        fg.append(labels.tolist())
        # the 0.75 RoI: centre y 37.5 -> 50 over height 75, height 75 -> 100: dy = wy / 6, dh = wh * log(4 / 3)
        wx, wy, ww, wh = stage.box_coder.weights
        torch.testing.assert_close(targets_[2], torch.tensor([0.0, wy / 6, 0.0, wh * math.log(4 / 3)]))
    assert fg == [[2, 2, 2, 2], [0, 2, 2, 2], [0, 0, 2, 2]]


def test_refinement_is_class_agnostic_detached_and_clipped():
    heads = thin_cascade().train()
    roi = torch.tensor([[10.0, 10.0, 50.0, 30.0], [100.0, 40.0, 120.0, 60.0]])   # w 40, h 20; w 20, h 20
    # stage 1 weights (10, 10, 5, 5): dx = 10 / 10 = 1 moves the centre by one width; dh = 5 log 2 / 5 doubles h
    deltas = torch.tensor([[10.0, 0.0, 0.0, 5 * math.log(2)], [10.0, 0.0, 0.0, 0.0]], requires_grad=True)
    (boxes,) = heads.next_rois(heads.stages[0], deltas, [roi], [(64, 128)])
    assert not boxes.requires_grad
    torch.testing.assert_close(boxes, torch.tensor([[50.0, 0.0, 90.0, 40.0], [120.0, 40.0, 128.0, 60.0]]))
    # a box pushed entirely off the image is empty after clipping: dropped in training, kept at test
    off = torch.tensor([[100.0, 0.0, 0.0, 0.0]])
    assert heads.next_rois(heads.stages[0], off, [roi[:1]], [(64, 128)])[0].shape == (0, 4)
    assert heads.eval().next_rois(heads.stages[0], off, [roi[:1]], [(64, 128)])[0].shape == (1, 4)


def test_class_agnostic_loss_is_the_class_specific_loss_with_one_shared_column():
    g = torch.Generator().manual_seed(0)
    logits, deltas, targets_ = (torch.randn(5, n, generator=g) for n in (K, 4, 4))
    labels = torch.tensor([0, 1, 2, 2, 0])
    agnostic = fast_rcnn_loss(logits, deltas, labels, targets_)
    specific = fast_rcnn_loss(logits, deltas.repeat(1, K), labels, targets_)   # (5, K*4): the same 4 in every class
    assert agnostic[1] > 0 and torch.equal(agnostic[0], specific[0]) and torch.equal(agnostic[1], specific[1])


def set_stage_outputs(stage, probs, dx):
    """Make a stage's predictor ignore its input: class probabilities probs, class-agnostic deltas (dx, 0, 0, 0)."""
    with torch.no_grad():
        stage.box_predictor.cls_score.weight.zero_()
        stage.box_predictor.cls_score.bias.copy_(torch.tensor(probs).log())   # softmax(log p) = p
        stage.box_predictor.bbox_pred.weight.zero_()
        stage.box_predictor.bbox_pred.bias.copy_(torch.tensor([dx, 0.0, 0.0, 0.0]))


def test_scores_are_the_stages_average_and_boxes_the_last_stage():
    heads = thin_cascade(mask=False).eval()
    # each stage moves the box right by a quarter of its width: dx = 0.25 x its coder's wx (10, 20, 30)
    set_stage_outputs(heads.stages[0], [0.1, 0.6, 0.3], 2.5)
    set_stage_outputs(heads.stages[1], [0.1, 0.3, 0.6], 5.0)
    set_stage_outputs(heads.stages[2], [0.1, 0.3, 0.6], 7.5)
    roi = torch.tensor([[10.0, 10.0, 50.0, 30.0]])
    with torch.no_grad():
        detections = heads(features(), [roi, roi[:0]], IMAGE_SHAPE, IMAGE_SIZES)
    d = detections[0]
    # mean of (0.6, 0.3, 0.3) = 0.4 for class 1 and of (0.3, 0.6, 0.6) = 0.5 for class 2; the last stage alone
    # would give 0.3 / 0.6. Three shifts of 10 px: [10, 50] -> [20, 60] -> [30, 70] -> [40, 80], the same for both
    # classes (class-agnostic).
    assert d["labels"].tolist() == [2, 1]
    torch.testing.assert_close(d["scores"], torch.tensor([0.5, 0.4]))
    torch.testing.assert_close(d["boxes"], torch.tensor([[40.0, 10.0, 80.0, 30.0]] * 2))
    assert detections[1]["boxes"].shape == (0, 4)


def test_scale_gradient_is_identity_forward_and_scales_backward():
    x = torch.tensor([1.0, -2.0], requires_grad=True)
    y = scale_gradient(x * 1, 1 / 3)
    (y * torch.tensor([3.0, 6.0])).sum().backward()
    assert torch.equal(y.detach(), torch.tensor([1.0, -2.0]))
    torch.testing.assert_close(x.grad, torch.tensor([1.0, 2.0]))


def test_training_step_gives_stage_losses_and_reaches_every_stage():
    torch.manual_seed(0)
    heads = thin_cascade().train()
    feats = [f.requires_grad_() for f in features()]
    proposals = [torch.tensor([[18.0, 8.0, 62.0, 44.0], [0.0, 0.0, 30.0, 30.0], [72.0, 18.0, 118.0, 52.0]]),
                 torch.tensor([[5.0, 5.0, 40.0, 40.0]])]
    losses = heads(feats, proposals, IMAGE_SHAPE, IMAGE_SIZES, targets())
    assert set(losses) == {f"loss_{t}_stage{k}" for t in ("cls", "box") for k in (1, 2, 3)} | {"loss_mask"}
    assert all(torch.isfinite(v) for v in losses.values())
    sum(losses.values()).backward()
    for stage in heads.stages:
        for p in list(stage.box_head.parameters()) + list(stage.box_predictor.parameters()):
            assert p.grad is not None and p.grad.abs().sum() > 0
    assert all(p.grad is not None for p in heads.mask_head.parameters())
    assert feats[0].grad.abs().sum() > 0        # these small RoIs all pool from the stride-4 level (FPN Eq. 1)


@pytest.fixture(scope="module")
def tiny_pair():
    torch.manual_seed(0)
    return build_model("tiny", num_classes=K), build_model("tiny", num_classes=K, cascade=True)


def test_cascade_model_eval_outputs(tiny_pair):
    model = tiny_pair[1].eval()
    with torch.no_grad():
        (out,) = model(torch.randn(1, 3, 64, 96), [(64, 96)], original_sizes=[(32, 48)])
    D = out["boxes"].shape[0]
    assert D > 0 and out["scores"].shape == (D,) and out["labels"].shape == (D,)
    assert out["masks"].shape == (D, 1, 32, 48)
    assert out["boxes"][:, 2].max() <= 48 and out["boxes"][:, 3].max() <= 32


def test_mask_rcnn_weights_load_into_stage_one(tiny_pair, tmp_path):
    mask_rcnn, cascade = tiny_pair
    state = mask_rcnn.state_dict()
    assert "roi_heads.stages.0.box_head.fcs.0.weight" in cascade_state_dict(state)
    missing, unexpected, skipped = checkpoint.load_state_dict_non_strict(cascade, state)
    # the class-specific box deltas (K*4 outputs) do not fit stage 1's class-agnostic predictor (4 outputs)
    assert skipped == ["roi_heads.stages.0.box_predictor.bbox_pred.weight",
                       "roi_heads.stages.0.box_predictor.bbox_pred.bias"]
    assert unexpected == []
    assert sorted(k for k in missing if ".stages.0." in k) == sorted(skipped)   # only they keep their init
    assert {k.split(".")[2] for k in missing} == {"0", "1", "2"}                # the rest: stages 2 and 3
    mine = cascade.state_dict()
    renamed = cascade_state_dict(state)
    assert "roi_heads.mask_head.deconv.weight" in renamed and "roi_heads.mask_head.deconv.weight" in state
    for (name, value), key in zip(state.items(), renamed):    # backbone, FPN, RPN, mask head; box head -> stage 1
        if key not in skipped:
            assert torch.equal(mine[key], value), name

    # the same through train.py --weights, from a checkpoint file
    torch.save({"model": state, "iteration": 90}, tmp_path / "model.pth")
    checkpoint.load_weights(cascade, str(tmp_path / "model.pth"))
    with pytest.raises(SystemExit, match="does not exist"):
        checkpoint.load_weights(cascade, str(tmp_path / "missing.pth"))


def test_switching_a_mask_rcnn_run_to_cascade(tmp_path, capsys):
    # the paper's recipe (Sec. 5): train Mask R-CNN, then continue from its weights as a cascade, from iteration 0
    make_shapes(str(tmp_path / "shapes"), num_train=4, num_val=2, seed=0)
    ann, images = tmp_path / "shapes" / "annotations", tmp_path / "shapes"
    common = ["--train-ann", str(ann / "instances_train.json"), "--train-images", str(images / "train"),
              "--val-ann", str(ann / "instances_val.json"), "--val-images", str(images / "val"), "--data", "custom",
              "--preset", "tiny", "--device", "cpu", "--batch-size", "2", "--min-size", "64", "--workers", "0",
              "--max-iters", "1", "--no-eval"]
    train.main(common + ["--output-dir", str(tmp_path / "mask_rcnn")])
    train.main(common + ["--output-dir", str(tmp_path / "cascade"), "--cascade",
                         "--weights", str(tmp_path / "mask_rcnn" / "model_0000001.pth")])
    out = capsys.readouterr().out
    assert "0 unexpected keys" in out and "2 skipped for their shape" in out and "tiny + cascade" in out
    ckpt = torch.load(tmp_path / "cascade" / "model_0000001.pth", weights_only=False)
    assert ckpt["iteration"] == 1 and "loss_cls_stage3" in open(tmp_path / "cascade" / "metrics.jsonl").read()
    model, _ = evaluate.load_run(str(tmp_path / "cascade" / "model_0000001.pth"))   # rebuilt as a cascade
    assert isinstance(model.roi_heads, CascadeRoIHeads)
    # --resume needs the same architecture: the switch is a new run with --weights, and the error says so
    with pytest.raises(SystemExit, match="without --cascade; start a new run with --weights"):
        train.main(common + ["--output-dir", str(tmp_path / "x"), "--cascade",
                             "--resume", str(tmp_path / "mask_rcnn" / "model_0000001.pth")])


def test_training_stages_sample_in_turn_each_at_its_own_iou(monkeypatch):
    # Proposals [20, 10, 60, L] inside the GT [20, 10, 60, 40] overlap it with IoU (L - 10) / 30 = 0.55, 0.65, 0.75.
    # Their refined copies barely move (deltas ~ N(0, 0.001^2) init), so each stage sees them again; a stage must
    # label foreground exactly the RoIs at IoU >= its own u_k, and stage k (not stage 1) must do stage k's sampling.
    calls, sample_rois = [], RoIHeads.sample_rois

    def spy(self, proposals, targets_):
        out = sample_rois(self, proposals, targets_)
        calls.append((self, out))
        return out

    monkeypatch.setattr(RoIHeads, "sample_rois", spy)
    torch.manual_seed(0)
    heads = thin_cascade(mask=False).train()
    proposals = [torch.tensor([[20.0, 10.0, 60.0, 26.5], [20.0, 10.0, 60.0, 29.5], [20.0, 10.0, 60.0, 32.5],
                               [0.0, 0.0, 10.0, 10.0]]), torch.tensor([[5.0, 5.0, 40.0, 40.0]])]
    heads(features(), proposals, IMAGE_SHAPE, IMAGE_SIZES, targets())
    assert [stage for stage, _ in calls] == list(heads.stages)
    gt = targets()[0]["boxes"]
    for (stage, (rois, labels, matched, _)), u in zip(calls, (0.5, 0.6, 0.7)):
        iou = box_iou(gt, rois[0])[matched[0], torch.arange(len(rois[0]))]     # each RoI of image 0 with its GT
        assert torch.equal(labels[:len(rois[0])] > 0, iou >= u), u
        assert ((iou >= 0.5) & (iou < u)).any() == (u > 0.5)   # the 0.55 (and at 0.7 the 0.65) RoIs: background


def test_a_stage_sends_a_third_of_its_gradient_into_the_shared_features():
    # run_stage = the stage's head on the pooled features with their gradient scaled by 1 / 3 (Detectron2): the
    # features get a third of what the same head, applied directly, sends them; the head's own gradients are unscaled.
    heads = thin_cascade(mask=False)
    stage = heads.stages[1]
    rois = [torch.tensor([[18.0, 8.0, 62.0, 44.0], [0.0, 0.0, 30.0, 30.0]]), torch.tensor([[5.0, 5.0, 40.0, 40.0]])]
    grads = []
    for through_cascade in (True, False):
        feats = [f.requires_grad_() for f in features()]
        heads.zero_grad()
        if through_cascade:
            logits, deltas = heads.run_stage(stage, feats, rois, IMAGE_SHAPE)
        else:
            pooled = multilevel_roi_align(feats, rois, IMAGE_SHAPE, stage.box_resolution, stage.sampling_ratio,
                                          stage.aligned)
            logits, deltas = stage.box_predictor(stage.box_head(pooled))
        (logits.sum() + deltas.sum()).backward()
        grads.append((feats[0].grad, [p.grad.clone() for p in stage.parameters() if p.grad is not None]))
    (cascade_feat, cascade_params), (direct_feat, direct_params) = grads
    assert direct_feat.abs().sum() > 0
    torch.testing.assert_close(cascade_feat, direct_feat / 3)
    assert len(cascade_params) == len(direct_params) > 0
    for a, b in zip(cascade_params, direct_params):
        torch.testing.assert_close(a, b)
