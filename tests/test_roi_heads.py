"""RoIAlign, FPN level mapping, the box/mask heads and RoIHeads, checked against torchvision and small hand examples."""
import math
from collections import OrderedDict

import pytest
import torch

import roi_align as roi_align_module
from boxes import box_area
from masks import mask_loss
from model import PRESETS, build_model
from roi_heads import (BoxHead, BoxPredictor, MaskHead, RoIHeads, fast_rcnn_loss, map_levels, mask_targets,
                       multilevel_roi_align, paste_masks, roi_align)

tv = pytest.importorskip("torchvision")


@pytest.fixture(params=["sparse", "grid_sample"])
def pooling(request, monkeypatch):
    """Runs a test with each way RoIAlign reads its points, whatever the device and the need for gradients: a sparse
    matrix product (training on a CPU) and grid_sample (GPUs, inference on a CPU)."""
    monkeypatch.setattr(roi_align_module, "sparse_pooling", lambda maps: request.param == "sparse")
    return request.param


def random_boxes(n, size, min_side=0.2, max_side=None, generator=None):
    """n valid (x1 < x2, y1 < y2) boxes of sides in [min_side, max_side] around an image of (h, w) = size."""
    h, w = size
    max_side = max_side or max(h, w)
    xy = torch.rand(n, 2, generator=generator, dtype=torch.float64) * torch.tensor([w, h]) * 1.4 - 0.2 * torch.tensor(
        [w, h])  # top-left corners, some left of / above the image
    wh = min_side + torch.rand(n, 2, generator=generator, dtype=torch.float64) * (max_side - min_side)
    return torch.cat([xy, xy + wh], dim=1)  # (n, 4)


# ---------------------------------------------------------------- roi_align
def test_sparse_pooling_for_cpu_maps_that_need_gradients():
    maps = [torch.zeros(1, 2, 4, 4, requires_grad=True)]
    assert roi_align_module.sparse_pooling(maps)  # training on a CPU: grid_sample's backward is the slow part
    with torch.no_grad():
        assert not roi_align_module.sparse_pooling(maps)  # inference: grid_sample's forward is the fast one
    assert not roi_align_module.sparse_pooling([torch.zeros(1, 2, 4, 4)])


@pytest.mark.parametrize("aligned", [False, True])
@pytest.mark.parametrize("sampling_ratio", [2, -1, 0])
@pytest.mark.parametrize("spatial_scale", [1.0, 0.25])
def test_roi_align_matches_torchvision_values_and_gradients(aligned, sampling_ratio, spatial_scale, pooling):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 13, 17, generator=g, dtype=torch.float64, requires_grad=True)
    image = (13 / spatial_scale, 17 / spatial_scale)
    boxes = random_boxes(40, image, min_side=0.1, generator=g)
    boxes[:4] = torch.tensor([[-40.0, -40, -20, -30],  # fully above-left of the map
                              [200, 10, 260, 90],  # fully right of the map
                              [-8, -8, 6, 5],  # crossing the top-left corner
                              [3.3, 4.1, 3.4, 4.15]]) / spatial_scale  # tiny: below one pixel
    rois = torch.cat([torch.randint(0, 2, (40, 1), generator=g).double(), boxes], dim=1)
    ours = roi_align(x, rois, (5, 4), spatial_scale, sampling_ratio, aligned)
    ref = tv.ops.roi_align(x, rois, (5, 4), spatial_scale, sampling_ratio, aligned)
    torch.testing.assert_close(ours, ref, rtol=0, atol=1e-12)
    assert ref[:2].abs().max() == 0 and ref[2:].abs().max() > 0  # the outside boxes really read zeros
    upstream = torch.randn(ref.shape, generator=g, dtype=torch.float64)
    (grad_ours,) = torch.autograd.grad(ours, x, upstream)
    (grad_ref,) = torch.autograd.grad(ref, x, upstream)
    torch.testing.assert_close(grad_ours, grad_ref, rtol=0, atol=1e-12)


def test_roi_align_float32_list_boxes_and_bfloat16(pooling):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 8, 50, 76, generator=g)
    boxes = [random_boxes(n, (200, 304), min_side=2, generator=g).float() for n in (30, 0)]  # one image without RoIs
    ours = roi_align(x, boxes, 7, 0.25, 2)
    ref = tv.ops.roi_align(x, boxes, 7, 0.25, 2)
    assert ours.shape == (30, 8, 7, 7)
    torch.testing.assert_close(ours, ref, rtol=0, atol=1e-4)  # float32: the normalized grid rounds to ~1e-5 pixel
    low = roi_align(x.bfloat16(), boxes, 7, 0.25, 2)
    assert low.dtype == torch.bfloat16
    torch.testing.assert_close(low.float(), ref, rtol=0.02, atol=0.05)
    assert roi_align(x, [torch.zeros(0, 4)] * 2, 7, 0.25, 2).shape == (0, 8, 7, 7)


@pytest.mark.parametrize("aligned, shift", [(False, 0.0), (True, 0.5)])
def test_roi_align_on_a_ramp_reads_the_bin_centres(aligned, shift, pooling):
    # f(y, x) = x at pixel (y, x). Bilinear interpolation of a ramp is exact and the points of a bin are symmetric
    # about its centre, so every pooled value is the x of the bin centre (aligned=True: minus half a pixel).
    ramp = torch.arange(10.0).expand(1, 1, 8, 10)
    box = torch.tensor([[0.0, 1.0, 2.0, 7.0, 6.0]])  # x from 1 to 7: three bins of width 2, centres 2, 4, 6
    out = roi_align(ramp, box, (2, 3), sampling_ratio=2, aligned=aligned)
    expected = torch.tensor([2.0, 4.0, 6.0]) - shift
    torch.testing.assert_close(out[0, 0], expected.expand(2, 3))


def test_roi_align_counts_points_outside_the_map_as_zero(pooling):
    ones = torch.ones(1, 1, 4, 4)
    # x from -4 to 4 in 2 bins: bin 0 has points at -3 and -1 (x < -1 is dropped, -1 is clamped to 0 and read as 1);
    # bin 1 has points at 1 and 3: both inside. Averages: (0 + 1) / 2 and 1.
    out = roi_align(ones, torch.tensor([[0.0, -4.0, 1.0, 4.0, 3.0]]), (1, 2), sampling_ratio=2)
    torch.testing.assert_close(out[0, 0, 0], torch.tensor([0.5, 1.0]))


# ---------------------------------------------------------------- FPN level mapping and multi-level RoIAlign
def test_map_levels_fpn_equation_1():
    sides = torch.tensor([112.0, 224.0, 448.0, 896.0, 10.0])
    boxes = torch.stack([torch.zeros(5), torch.zeros(5), sides, sides], dim=1)
    # k = floor(4 + log2(side / 224)), clamped to [2, 5]
    assert map_levels(boxes).tolist() == [3, 4, 5, 5, 2]
    # a 210-pixel box resized by 800 / 375 in float32: side 447.99988, a hair below 448, still level 5 (the + 1e-6)
    resized = torch.tensor([[750.0, 750.0, 960.0, 960.0]]) * torch.tensor(800 / 375)
    assert torch.sqrt(box_area(resized)).item() < 448 and map_levels(resized).tolist() == [5]


@pytest.mark.parametrize("H, W", [(256, 320), (384, 896)])  # a wide batch too: the level scales come from heights
def test_multilevel_roi_align_matches_torchvision(pooling, H, W):
    g = torch.Generator().manual_seed(2)
    features = [torch.randn(2, 4, H // s, W // s, generator=g) for s in (4, 8, 16, 32)]  # P2..P5
    boxes = [random_boxes(n, (H, W), min_side=8, max_side=900, generator=g).float() for n in (60, 25)]
    pooler = tv.ops.MultiScaleRoIAlign(["0", "1", "2", "3"], output_size=7, sampling_ratio=2)
    ref = pooler(OrderedDict((str(i), f) for i, f in enumerate(features)), boxes, [(H, W)] * 2)
    ours = multilevel_roi_align(features, boxes, (H, W), 7, sampling_ratio=2)
    assert len(set(map_levels(torch.cat(boxes)).tolist())) == 4  # every level is used
    torch.testing.assert_close(ours, ref, rtol=0, atol=1e-4)


def test_multilevel_roi_align_needs_boxes_for_each_image():
    features = [torch.zeros(2, 4, 64 // s, 80 // s) for s in (4, 8, 16, 32)]
    boxes = [torch.tensor([[0.0, 0.0, 10.0, 10.0]])] * 3  # image 2 would be read from P3's image 0
    with pytest.raises(ValueError, match="multilevel_roi_align: boxes for 3 images, features for 2"):
        multilevel_roi_align(features, boxes, (64, 80), 7)


# ---------------------------------------------------------------- mask targets and pasting
def test_mask_targets_match_torchvision_project_masks_on_boxes():
    from torchvision.models.detection.roi_heads import project_masks_on_boxes

    g = torch.Generator().manual_seed(3)
    gt_masks = (torch.rand(3, 45, 60, generator=g) > 0.5).to(torch.uint8)
    rois = random_boxes(20, (45, 60), min_side=0.3, max_side=70, generator=g).float()
    gt_index = torch.randint(0, 3, (20,), generator=g)
    ref = project_masks_on_boxes(gt_masks, rois, gt_index, 28)
    torch.testing.assert_close(mask_targets(gt_masks, rois, gt_index, 28), ref, rtol=0, atol=1e-5)
    assert mask_targets(gt_masks, rois[:0], gt_index[:0], 28).shape == (0, 28, 28)


def test_paste_masks_matches_torchvision():
    from torchvision.models.detection.roi_heads import paste_masks_in_image

    g = torch.Generator().manual_seed(4)
    boxes = torch.tensor([[10.0, 12.0, 40.0, 30.0],  # inside
                          [45.2, 30.7, 70.0, 50.0],  # crossing the right and bottom borders
                          [-6.3, -3.2, 8.9, 9.4],  # crossing the top-left corner
                          [20.4, 20.2, 20.9, 20.5],  # tiny: under one pixel
                          [0.0, 0.0, 60.0, 48.0]])  # the whole image
    masks = torch.rand(5, 1, 28, 28, generator=g)
    ref = paste_masks_in_image(masks, boxes, (48, 60), padding=1)
    ours = paste_masks(masks, boxes, (48, 60))
    assert ours.shape == (5, 1, 48, 60)
    torch.testing.assert_close(ours, ref, rtol=0, atol=1e-6)
    assert paste_masks(masks[:0], boxes[:0], (48, 60)).shape == (0, 1, 48, 60)


def test_paste_masks_of_a_constant_mask_fill_the_box():
    # A mask of ones pasted at an integer box: inside the box the padded mask's interpolation is 1 except at the
    # one-pixel border ring where it fades into the zero padding; outside the expanded box everything is 0.
    out = paste_masks(torch.ones(1, 1, 28, 28), torch.tensor([[10.0, 10.0, 38.0, 38.0]]), (50, 50))[0, 0]
    assert out[15:34, 15:34].eq(1).all()
    assert out[:8].eq(0).all() and out[:, 41:].eq(0).all()


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
        detections, losses = ours(features, proposals, IMAGE_SHAPE, IMAGE_SIZES)
        expected, _ = ref(OrderedDict((str(i), f) for i, f in enumerate(features)), proposals, IMAGE_SIZES)
    assert losses == {}
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
    detections, losses = ours(features, proposals, IMAGE_SHAPE, IMAGE_SIZES, targets)
    torch.manual_seed(7)
    _, expected = ref(OrderedDict((str(i), f) for i, f in enumerate(features)), proposals, IMAGE_SIZES, targets)
    assert detections == [] and set(losses) == {"loss_cls", "loss_box", "loss_mask"}
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
    losses = ours(features, proposals, IMAGE_SHAPE, IMAGE_SIZES, targets)[1]
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
    losses = heads(features, proposals, IMAGE_SHAPE, IMAGE_SIZES, targets)[1]
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
        detections, _ = heads(features, proposals, IMAGE_SHAPE, IMAGE_SIZES)
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
