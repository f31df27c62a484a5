"""fast_ops.py equals the plain versions of the reading path, on random and edge-case inputs.

The plain versions are compared with torchvision in their own tests (test_norm.py, test_boxes.py, test_roi_align.py,
test_rpn.py); here each fast function is compared with its plain twin directly: no boxes, ties in scores, empty
levels, bf16, channels-last, gradients. Last, a training step and an inference of the whole tiny model give the same
losses, gradients and detections with fast_ops and with plain_ops.
"""
import pytest
import torch

import boxes
import fast_ops
import masks
import roi_align
from model import build_model
from norm import group_norm
from rpn import RPN


def random_boxes(n, size=(200.0, 300.0), min_side=1.0, max_side=80.0, generator=None):
    h, w = size
    xy = torch.rand(n, 2, generator=generator) * torch.tensor([w * 1.2, h * 1.2]) - torch.tensor([w * 0.1, h * 0.1])
    wh = min_side + torch.rand(n, 2, generator=generator) * (max_side - min_side)
    return torch.cat([xy, xy + wh], dim=1)  # (n, 4), some crossing the image border


# ------------------------------------------------------------------------------------------------ GroupNorm
@pytest.mark.parametrize("shape, groups", [((2, 16, 5, 7), 4), ((3, 8, 4), 2), ((2, 12), 3), ((0, 8, 6, 6), 4)])
@pytest.mark.parametrize("grad", [True, False])
def test_group_norm_fast_equals_plain(shape, groups, grad):
    g = torch.Generator().manual_seed(0)
    x = (torch.randn(shape, generator=g) * 3 + 5).requires_grad_(grad)
    weight = (torch.rand(shape[1], generator=g) + 0.5).requires_grad_(grad)
    bias = torch.randn(shape[1], generator=g).requires_grad_(grad)
    fast, plain = fast_ops.group_norm(x, groups, weight, bias), group_norm(x, groups, weight, bias)
    torch.testing.assert_close(fast, plain)
    if grad:
        dy = torch.randn(shape, generator=g)
        inputs = (x, weight, bias)
        for a, b in zip(torch.autograd.grad(fast, inputs, dy), torch.autograd.grad(plain, inputs, dy)):
            torch.testing.assert_close(a, b)


def test_group_norm_fast_equals_plain_channels_last_and_bf16():
    g = torch.Generator().manual_seed(1)
    x = (torch.randn(2, 32, 6, 8, generator=g) + 20).contiguous(memory_format=torch.channels_last).requires_grad_()
    weight, bias = torch.rand(32, generator=g) + 0.5, torch.randn(32, generator=g)
    fast, plain = fast_ops.group_norm(x, 8, weight, bias), group_norm(x, 8, weight, bias)
    assert fast.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(fast, plain)
    low = x.detach().bfloat16()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        fast, plain = fast_ops.group_norm(low, 8, weight, bias), group_norm(low, 8, weight, bias)
    assert fast.dtype == plain.dtype == torch.bfloat16
    torch.testing.assert_close(fast.float(), plain.float(), rtol=0.02, atol=0.03)  # one bf16 rounding of y apart


# ------------------------------------------------------------------------------------------------ NMS
@pytest.mark.parametrize("n", [0, 1, 2, 50, 600])
def test_nms_fast_equals_plain_with_ties(n):
    g = torch.Generator().manual_seed(n)
    b = random_boxes(n, generator=g)
    b[: n // 10] = b[n // 10: 2 * (n // 10)]  # some identical boxes
    scores = torch.randint(0, 4, (n,), generator=g).float()  # many exact ties: input order decides
    classes = torch.randint(0, 5, (n,), generator=g)
    for threshold in (0.0, 0.3, 0.7, 1.0):
        assert torch.equal(fast_ops.nms(b, scores, threshold), boxes.nms(b, scores, threshold))
        assert torch.equal(fast_ops.batched_nms(b, scores, classes, threshold),
                           boxes.batched_nms(b, scores, classes, threshold))


@pytest.mark.parametrize("training", [True, False])
def test_select_proposals_fast_equals_plain(training):
    # Two images, three levels of different sizes (one smaller than pre_nms_top_n), tied logits, boxes crossing the
    # borders and some under min_size: the same proposals in the same order.
    g = torch.Generator().manual_seed(3)
    levels = [400, 120, 30]
    proposals = torch.stack([random_boxes(sum(levels), min_side=0.0, max_side=120, generator=g) for _ in range(2)])
    objectness = torch.randint(-3, 3, (2, sum(levels)), generator=g).float()  # ties
    rpn = RPN(in_channels=8, anchor_sizes=(32, 64, 128), pre_nms_top_n_train=100, post_nms_top_n_train=60,
              pre_nms_top_n_test=50, post_nms_top_n_test=40, min_size=2.0).train(training)
    fast = rpn.select_proposals(proposals, objectness, [(200, 300), (150, 260)], levels)
    rpn.plain_ops = True
    plain = rpn.select_proposals(proposals, objectness, [(200, 300), (150, 260)], levels)
    assert [len(p) for p in fast] == [len(p) for p in plain] and len(fast[0]) > 10
    for a, b in zip(fast, plain):
        assert torch.equal(a, b)


# ------------------------------------------------------------------------------------------------ RoIAlign
@pytest.mark.parametrize("pooling", ["grid", "sparse"])
def test_multilevel_roi_align_fast_equals_plain_with_an_empty_level(pooling):
    g = torch.Generator().manual_seed(4)
    H, W = 128, 160
    features = [torch.randn(2, 4, H // s, W // s, generator=g, dtype=torch.float64, requires_grad=True)
                for s in (4, 8, 16, 32)]
    rois = [random_boxes(12, (H, W), min_side=4, max_side=60, generator=g).double() for _ in range(2)]
    assert (roi_align.map_levels(torch.cat(rois)) < 5).all()  # P5 gets no RoI
    fast = fast_ops.multilevel_roi_align(features, rois, (H, W), 7, 2, pooling=pooling)
    plain = roi_align.multilevel_roi_align(features, rois, (H, W), 7, 2)
    torch.testing.assert_close(fast, plain, rtol=0, atol=1e-12)
    dy = torch.randn(fast.shape, generator=g, dtype=torch.float64)
    grads_fast = torch.autograd.grad(fast, features, dy, allow_unused=True)
    grads_plain = torch.autograd.grad(plain, features, dy, allow_unused=True)
    for a, b, f in zip(grads_fast, grads_plain, features):
        zero = torch.zeros_like(f)  # an unused level: None or zeros
        torch.testing.assert_close(zero if a is None else a, zero if b is None else b, rtol=0, atol=1e-12)
    no_rois = [r[:0] for r in rois]
    assert fast_ops.multilevel_roi_align(features, no_rois, (H, W), 7).shape == (0, 4, 7, 7)
    assert roi_align.multilevel_roi_align(features, no_rois, (H, W), 7).shape == (0, 4, 7, 7)


def test_roi_align_fast_equals_plain_bf16_and_channels_last():
    g = torch.Generator().manual_seed(5)
    x = torch.randn(2, 8, 20, 24, generator=g).contiguous(memory_format=torch.channels_last)
    rois = torch.cat([torch.randint(0, 2, (30, 1), generator=g).float(),
                      random_boxes(30, (80, 96), max_side=50, generator=g)], dim=1)
    torch.testing.assert_close(fast_ops.roi_align(x, rois, 7, 0.25, 2), roi_align.roi_align(x, rois, 7, 0.25, 2),
                               rtol=0, atol=1e-5)
    low = x.bfloat16()
    fast, plain = fast_ops.roi_align(low, rois, 7, 0.25, 2), roi_align.roi_align(low, rois, 7, 0.25, 2)
    assert fast.dtype == plain.dtype == torch.bfloat16
    torch.testing.assert_close(fast.float(), plain.float(), rtol=0.01, atol=0.02)  # one bf16 rounding apart


def test_mask_targets_fast_equals_plain():
    g = torch.Generator().manual_seed(6)
    gt_masks = (torch.rand(4, 30, 40, generator=g) > 0.4).to(torch.uint8)
    rois = random_boxes(25, (30, 40), min_side=0.2, max_side=60, generator=g)
    gt_index = torch.randint(0, 4, (25,), generator=g)
    torch.testing.assert_close(fast_ops.mask_targets(gt_masks, rois, gt_index, 28),
                               roi_align.mask_targets(gt_masks, rois, gt_index, 28), rtol=0, atol=1e-5)
    assert roi_align.mask_targets(gt_masks, rois[:0], gt_index[:0], 28).shape == (0, 28, 28)


def test_paste_masks_fast_equals_plain_inside_and_off_the_image():
    g = torch.Generator().manual_seed(7)
    b = torch.cat([random_boxes(20, (48, 60), min_side=0.3, max_side=70, generator=g),
                   torch.tensor([[-40.0, -30, -10, -5], [70, 60, 90, 80]])])  # wholly off the image
    probs = torch.rand(22, 1, 28, 28, generator=g)
    fast, plain = fast_ops.paste_masks(probs, b, (48, 60)), masks.paste_masks(probs, b, (48, 60))
    torch.testing.assert_close(fast, plain, rtol=0, atol=1e-5)  # matrix products sum in another order
    assert plain[20:].abs().max() == 0
    assert masks.paste_masks(probs[:0], b[:0], (48, 60)).shape == (0, 1, 48, 60)


def test_degenerate_boxes_plain_fast_and_torchvision_agree():
    # Boxes that the model filters out before these ops, but a caller may pass: empty boxes (IoU 0/0 = NaN suppresses
    # nothing), an inverted RoI with aligned=True (no sampling points: zeros), an inverted box to paste (nothing).
    tv = pytest.importorskip("torchvision")
    b, s = torch.tensor([[5.0, 5, 5, 5], [5, 5, 5, 5], [0, 0, 10, 10]]), torch.tensor([0.9, 0.8, 0.7])
    assert boxes.nms(b, s, 0.5).tolist() == fast_ops.nms(b, s, 0.5).tolist() == tv.ops.nms(b, s, 0.5).tolist()
    x, inverted = torch.randn(1, 2, 10, 10), torch.tensor([[0.0, 5, 5, 3, 3]])
    expected = tv.ops.roi_align(x, inverted, 2, 1.0, -1, True)
    torch.testing.assert_close(roi_align.roi_align(x, inverted, 2, 1.0, -1, True), expected)
    torch.testing.assert_close(fast_ops.roi_align(x, inverted, 2, 1.0, -1, True), expected)
    ones, box = torch.ones(1, 1, 28, 28), torch.tensor([[10.0, 10, 5, 5]])
    assert masks.paste_masks(ones, box, (20, 20)).sum() == fast_ops.paste_masks(ones, box, (20, 20)).sum() == 0


# ------------------------------------------------------------------------------------------------ the whole model
def tiny_batch():
    g = torch.Generator().manual_seed(8)
    images = torch.randn(2, 3, 128, 160, generator=g)
    targets = []
    for n in (3, 1):
        corner = torch.rand(n, 2, generator=g) * 60
        b = torch.cat([corner, corner + 20 + torch.rand(n, 2, generator=g) * 40], dim=1)  # inside the 120 x 150 image
        m = torch.zeros(n, 128, 160, dtype=torch.uint8)
        for i, (x1, y1, x2, y2) in enumerate(b.long().tolist()):
            m[i, y1:y2, x1:x2] = 1
        targets.append({"boxes": b, "labels": torch.randint(1, 3, (n,), generator=g), "masks": m})
    return images, [(128, 160), (120, 150)], targets


def test_tiny_model_training_step_and_inference_same_with_plain_ops():
    torch.manual_seed(0)
    fast = build_model("tiny", num_classes=3)
    torch.manual_seed(0)
    plain = build_model("tiny", num_classes=3, plain_ops=True)  # the same weights: the same seed
    for p, q in zip(fast.state_dict().values(), plain.state_dict().values()):
        assert torch.equal(p, q)
    switches = [type(m).__name__ for m in plain.modules() if getattr(m, "plain_ops", False)]
    assert {"GroupNorm", "RPN", "RoIHeads", "MaskHead", "MaskRCNN"} <= set(switches)
    images, sizes, targets = tiny_batch()
    losses = {}
    for name, model in (("fast", fast), ("plain", plain)):
        torch.manual_seed(1)  # the same RPN and RoI samples
        losses[name] = model.train()(images, sizes, targets)
        sum(losses[name].values()).backward()
    assert set(losses["fast"]) == set(losses["plain"]) and losses["fast"]["loss_mask"] > 0
    for key in losses["fast"]:
        torch.testing.assert_close(losses["fast"][key], losses["plain"][key], rtol=1e-4, atol=1e-5)
    for (name, p), q in zip(fast.named_parameters(), plain.parameters()):
        assert (p.grad is None) == (q.grad is None), name
        if p.grad is not None:  # float32 sums in another order: relative to each tensor's largest gradient
            assert (p.grad - q.grad).abs().max() <= 1e-3 * p.grad.abs().max() + 1e-7, name

    with torch.no_grad():
        fast.eval().roi_heads.score_thresh = plain.eval().roi_heads.score_thresh = 0.0  # untrained: keep boxes
        out_fast, out_plain = fast(images, sizes), plain(images, sizes)
    for a, b in zip(out_fast, out_plain):
        assert len(a["boxes"]) > 0 and torch.equal(a["labels"], b["labels"])
        torch.testing.assert_close(a["boxes"], b["boxes"], rtol=0, atol=1e-3)
        torch.testing.assert_close(a["scores"], b["scores"], rtol=0, atol=1e-5)
        torch.testing.assert_close(a["masks"], b["masks"], rtol=0, atol=1e-4)
