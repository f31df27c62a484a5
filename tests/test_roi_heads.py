"""The box and mask heads and RoIHeads, checked against torchvision and small hand examples, with fast_ops and with
the plain ops (RoIAlign, the FPN level map, mask targets and pasting themselves: test_roi_align.py)."""
import math
from collections import OrderedDict

import pytest
import torch

from masks import MaskHead, mask_loss
from model import PRESETS, build_model
from roi_heads import BoxHead, BoxPredictor, RoIHeads, fast_rcnn_loss
from test_roi_align import random_boxes

tv = pytest.importorskip("torchvision")


# ---------------------------------------------------------------- heads
def test_box_head_4conv1fc_gn_shapes():
    head = BoxHead(in_channels=64, resolution=7, num_convs=4, conv_dim=64, num_fcs=1, fc_dim=128, norm="gn")
    out = head(torch.randn(3, 64, 7, 7))
    assert out.shape == (3, 128) and head.out_channels == 128
    assert all(block[0].bias is None for block in head.convs)  # GN's beta replaces the conv bias
    assert sum(type(m).__name__ == "GroupNorm" for m in head.modules()) == 4
    assert (out >= 0).all()  # ReLU after the fc
    mask_head = MaskHead(in_channels=64, num_convs=4, conv_dim=64, norm="gn", num_classes=5)
    assert mask_head(torch.randn(3, 64, 14, 14)).shape == (3, 5, 28, 28)


def test_box_predictor_init():
    predictor = BoxPredictor(1024, 81)
    assert abs(predictor.cls_score.weight.std().item() - 0.01) < 0.001
    assert abs(predictor.bbox_pred.weight.std().item() - 0.001) < 0.0001
    assert predictor.cls_score.bias.eq(0).all() and predictor.bbox_pred.bias.eq(0).all()


@pytest.mark.parametrize("num_convs, num_fcs", [(4, 1), (0, 2)])
def test_box_head_fcs_get_caffe2_xavier_init(num_convs, num_fcs):
    # XavierFill = U(-sqrt(3 / fan_in), sqrt(3 / fan_in)): std 1 / sqrt(fan_in), biases 0 (Detectron's FC default).
    # nn.Linear's own default has a std sqrt(3) times smaller and random biases.
    head = BoxHead(in_channels=64, num_convs=num_convs, conv_dim=64, num_fcs=num_fcs, fc_dim=512,
                   norm="gn" if num_convs else "none", num_groups=8)
    assert len(head.fcs) == num_fcs
    for fc in head.fcs:
        fan_in = fc.weight.shape[1]
        assert fc.weight.abs().max() <= math.sqrt(3 / fan_in)
        assert abs(fc.weight.std().item() * math.sqrt(fan_in) - 1) < 0.02
        assert fc.bias.eq(0).all()


def test_mask_loss_without_positives_is_a_connected_zero():
    logits = torch.randn(0, 4, 28, 28, requires_grad=True)
    loss = mask_loss(logits, torch.zeros(0, dtype=torch.int64), torch.zeros(0, 28, 28))
    assert loss.item() == 0 and loss.requires_grad


# ---------------------------------------------------------------- RoIHeads against torchvision's
C, K, REP = 8, 4, 32  # channels, classes incl. background, fc width
IMAGE_SHAPE, IMAGE_SIZES = (256, 320), [(256, 320), (224, 290)]


def build_pair(**kw):
    """Our RoIHeads and torchvision's with the same weights (2fc box head, plain mask head, no norm)."""
    from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead
    from torchvision.models.detection.mask_rcnn import MaskRCNNHeads, MaskRCNNPredictor
    from torchvision.models.detection.roi_heads import RoIHeads as TVRoIHeads

    torch.manual_seed(0)
    tv_box_head, tv_predictor = TwoMLPHead(C * 49, REP), FastRCNNPredictor(REP, K)
    tv_mask_head, tv_mask_predictor = MaskRCNNHeads(C, [C] * 4, 1), MaskRCNNPredictor(C, C, K)
    box_head = BoxHead(in_channels=C, num_convs=0, num_fcs=2, fc_dim=REP, norm="none")
    predictor = BoxPredictor(REP, K)
    mask_head = MaskHead(in_channels=C, num_convs=4, conv_dim=C, norm="none", num_classes=K)
    box_head.load_state_dict({k.replace("fc6", "fcs.0").replace("fc7", "fcs.1"): v
                              for k, v in tv_box_head.state_dict().items()})
    predictor.load_state_dict(tv_predictor.state_dict())
    mask_state = {f"convs.{k}": v for k, v in tv_mask_head.state_dict().items()}
    mask_state.update({k.replace("conv5_mask", "deconv").replace("mask_fcn_logits", "mask_logits"): v
                       for k, v in tv_mask_predictor.state_dict().items()})
    mask_head.load_state_dict(mask_state)
    settings = dict(batch_size_per_image=10_000, positive_fraction=0.25, score_thresh=0.05, nms_thresh=0.5,
                    detections_per_img=100,  # a batch this large samples every RoI: no randomness to match
                    box_loss_beta=1 / 9)  # torchvision's smooth-L1
    settings.update(kw)
    ours = RoIHeads(box_head, predictor, mask_head, **settings)
    ref = TVRoIHeads(tv.ops.MultiScaleRoIAlign(["0", "1", "2", "3"], 7, 2), tv_box_head, tv_predictor, 0.5, 0.5,
                     settings["batch_size_per_image"], settings["positive_fraction"], None, settings["score_thresh"],
                     settings["nms_thresh"], settings["detections_per_img"],
                     mask_roi_pool=tv.ops.MultiScaleRoIAlign(["0", "1", "2", "3"], 14, 2), mask_head=tv_mask_head,
                     mask_predictor=tv_mask_predictor)
    return ours, ref


def make_inputs(num_gt=(3, 2)):
    g = torch.Generator().manual_seed(5)
    H, W = IMAGE_SHAPE
    features = [torch.randn(2, C, H // s, W // s, generator=g, requires_grad=True) for s in (4, 8, 16, 32)]
    proposals, targets = [], []
    for (h, w), n in zip(IMAGE_SIZES, num_gt):
        corner = torch.rand(n, 2, generator=g) * torch.tensor([w - 130.0, h - 130.0])  # objects inside the image
        gt = torch.cat([corner, corner + 12 + torch.rand(n, 2, generator=g) * 110], dim=1)  # sides 12..122
        jitter = gt.repeat(6, 1) + torch.randn(6 * n, 4, generator=g) * 6  # overlapping proposals: positives
        props = torch.cat([jitter, random_boxes(30, (h, w), min_side=6, max_side=250, generator=g).float()])
        xs, ys = props[:, 0::2].clamp(0, w), props[:, 1::2].clamp(0, h)  # (P, 2) each
        props = torch.stack([xs.min(1).values, ys.min(1).values, xs.max(1).values + 1, ys.max(1).values + 1],
                            dim=1)  # clipped, x1 < x2, y1 < y2 (x1, y1, x2, y2)
        masks = torch.zeros(n, h, w, dtype=torch.uint8)
        for i, (x1, y1, x2, y2) in enumerate(gt.round().long().tolist()):  # test data: a filled box per object
            masks[i, y1:y2, x1:x2] = 1
        proposals.append(props)
        targets.append({"boxes": gt, "labels": torch.randint(1, K, (n,), generator=g), "masks": masks})
    return features, proposals, targets


def test_roi_heads_eval_matches_torchvision():
    ours, ref = build_pair()
    ours.eval(), ref.eval()
    features, proposals, _ = make_inputs()
    with torch.no_grad():
        detections = ours(features, proposals, IMAGE_SHAPE, IMAGE_SIZES)
        expected, _ = ref(OrderedDict((str(i), f) for i, f in enumerate(features)), proposals, IMAGE_SIZES)
    for d, e in zip(detections, expected):
        assert d["boxes"].shape[0] > 5  # a real comparison, not two empty lists
        assert torch.equal(d["labels"], e["labels"]) and d["labels"].dtype == torch.int64
        torch.testing.assert_close(d["boxes"], e["boxes"], rtol=0, atol=1e-4)
        torch.testing.assert_close(d["scores"], e["scores"], rtol=0, atol=1e-6)
        torch.testing.assert_close(d["mask_probs"], e["masks"], rtol=0, atol=1e-5)


# (3, 0): the second image has no objects. batch 10_000 samples every RoI; batch 16 samples at random, and the same
# seed gives the same sample because both samplers make the same randperm calls in the same order.
@pytest.mark.parametrize("num_gt, batch_size", [((3, 2), 10_000), ((3, 0), 10_000), ((3, 2), 16)])
def test_roi_heads_training_losses_and_gradients_match_torchvision(num_gt, batch_size):
    ours, ref = build_pair(batch_size_per_image=batch_size)
    ours.train(), ref.train()
    features, proposals, targets = make_inputs(num_gt)
    torch.manual_seed(7)
    losses = ours(features, proposals, IMAGE_SHAPE, IMAGE_SIZES, targets)
    torch.manual_seed(7)
    _, expected = ref(OrderedDict((str(i), f) for i, f in enumerate(features)), proposals, IMAGE_SIZES, targets)
    assert set(losses) == {"loss_cls", "loss_box", "loss_mask"}
    assert losses["loss_box"] > 0 and losses["loss_mask"] > 0
    torch.testing.assert_close(losses["loss_cls"], expected["loss_classifier"], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(losses["loss_box"], expected["loss_box_reg"], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(losses["loss_mask"], expected["loss_mask"], rtol=1e-5, atol=1e-6)
    grads = torch.autograd.grad(sum(losses.values()), features, allow_unused=True)  # a level may pool no RoI
    expected_grads = torch.autograd.grad(sum(expected.values()), features, allow_unused=True)
    assert sum(a is not None for a in grads) >= 2
    for a, b, f in zip(grads, expected_grads, features):  # None (no RoI on the level) = zero gradient
        zero = torch.zeros_like(f)
        torch.testing.assert_close(zero if a is None else a, zero if b is None else b, rtol=0, atol=1e-5)


def test_roi_heads_training_without_any_object_gives_zero_mask_loss():
    ours, _ = build_pair()
    features, proposals, targets = make_inputs((0, 0))
    losses = ours(features, proposals, IMAGE_SHAPE, IMAGE_SIZES, targets)
    assert losses["loss_box"].item() == 0 and losses["loss_mask"].item() == 0 and losses["loss_cls"] > 0
    sum(losses.values()).backward()
    assert ours.mask_head.mask_logits.weight.grad is not None  # connected, so DDP sees every parameter used


def gn_heads(**kw):
    """The paper's heads (4conv1fc box head, 4-conv mask head, GN), thin."""
    return RoIHeads(BoxHead(in_channels=C, num_convs=4, conv_dim=32, fc_dim=REP, norm="gn"), BoxPredictor(REP, K),
                    MaskHead(in_channels=C, num_convs=4, conv_dim=32, norm="gn", num_classes=K), **kw)


def test_roi_heads_gn_4conv1fc_trains_every_parameter():
    heads = gn_heads().train()
    features, proposals, targets = make_inputs()
    losses = heads(features, proposals, IMAGE_SHAPE, IMAGE_SIZES, targets)
    assert all(torch.isfinite(v) for v in losses.values())
    sum(losses.values()).backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in heads.parameters())


@pytest.mark.parametrize("norm, no_proposals", [("none", False), ("gn", False), ("gn", True)])
def test_roi_heads_eval_without_detections_gives_empty_tensors(norm, no_proposals):
    # score_thresh=1.0: a softmax score is never > 1, so nothing survives; or there is no proposal at all
    if norm == "gn":
        heads = gn_heads(score_thresh=1.0).eval()
    else:
        heads = build_pair(score_thresh=1.0)[0].eval()
    features, proposals, _ = make_inputs()
    if no_proposals:
        proposals = [p[:0] for p in proposals]
    with torch.no_grad():
        detections = heads(features, proposals, IMAGE_SHAPE, IMAGE_SIZES)
    for d in detections:
        assert d["boxes"].shape == (0, 4) and d["scores"].shape == (0,)
        assert d["labels"].shape == (0,) and d["labels"].dtype == torch.int64
        assert d["mask_probs"].shape == (0, 1, 28, 28)


def test_box_loss_beta_is_detectrons_but_torchvisions_for_its_preset():
    # One foreground RoI (label 1) whose class-1 deltas miss the target by 0.5 in each coordinate, one background RoI.
    # Smooth-L1 per coordinate: beta 1 (Detectron) 0.5 * 0.5^2 / 1 = 0.125; beta 1/9 (torchvision) 0.5 - 1/18.
    # Summed over the 4 coordinates and divided by the 2 sampled RoIs.
    logits, deltas = torch.zeros(2, 3), torch.zeros(2, 12)
    deltas[0, 4:8] = 0.5
    labels, targets = torch.tensor([1, 0]), torch.zeros(2, 4)
    assert fast_rcnn_loss(logits, deltas, labels, targets)[1].item() == pytest.approx(4 * 0.125 / 2)
    torchvision_beta = fast_rcnn_loss(logits, deltas, labels, targets, beta=1 / 9)[1]
    assert torchvision_beta.item() == pytest.approx(4 * (0.5 - 1 / 18) / 2)
    assert build_model("tiny", num_classes=3).roi_heads.box_loss_beta == 1.0
    assert all(stage.box_loss_beta == 1.0 for stage in build_model("tiny", 3, cascade=True).roi_heads.stages)
    assert PRESETS["tv_maskrcnn_v1"]["box_loss_beta"] == 1 / 9  # test_model checks its losses equal torchvision's


def test_plain_ops_give_the_same_detections_masks_and_losses():
    # RoIHeads with the paper's plain RoIAlign, mask targets, NMS and GroupNorm (plain_ops=True on it and every
    # module of its heads, as build_model(plain_ops=True) sets it) against the default fast_ops versions.
    torch.manual_seed(0)
    heads = gn_heads(batch_size_per_image=10_000)  # a batch this large samples every RoI: no randomness to match
    features, proposals, targets = make_inputs()
    runs = []
    for plain in (False, True):
        switched = [m for m in heads.modules() if hasattr(m, "plain_ops")]
        for m in switched:
            m.plain_ops = plain
        assert {type(m).__name__ for m in switched} == {"RoIHeads", "MaskHead", "GroupNorm"}
        with torch.no_grad():
            detections = heads.eval()(features, proposals, IMAGE_SHAPE, IMAGE_SIZES)
        runs.append((detections, heads.train()(features, proposals, IMAGE_SHAPE, IMAGE_SIZES, targets)))
    (fast, fast_losses), (plain, plain_losses) = runs
    for f, p in zip(fast, plain, strict=True):
        assert f["boxes"].shape[0] > 5 and torch.equal(f["labels"], p["labels"])  # a real comparison
        torch.testing.assert_close(p["boxes"], f["boxes"], rtol=0, atol=1e-4)
        torch.testing.assert_close(p["scores"], f["scores"], rtol=0, atol=1e-6)
        torch.testing.assert_close(p["mask_probs"], f["mask_probs"], rtol=0, atol=5e-5)  # after 4 GN layers
    assert set(plain_losses) == set(fast_losses) == {"loss_cls", "loss_box", "loss_mask"}
    assert fast_losses["loss_mask"] > 0 and fast_losses["loss_box"] > 0
    for name in fast_losses:
        torch.testing.assert_close(plain_losses[name], fast_losses[name], rtol=1e-5, atol=1e-6)
