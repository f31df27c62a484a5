"""The paper's model against torchvision: r50_fpn_gn against torchvision's GN-all Mask R-CNN, r50_fpn_syncbn against
the same built with BatchNorm (our SyncBatchNorm in one process is BatchNorm), with the same weights, in float64.

torchvision's twin is bench.build_torchvision_twin: resnet50(norm_layer=GN), FeaturePyramidNetwork(norm_layer=GN),
FastRCNNConvFCHead (4conv1fc) and MaskRCNNHeads with GN (BatchNorm for SyncBN). Its weights, with the norms' affines
(and BN's running statistics) randomized, load into our preset through model.convert_torchvision_state_dict, and our
preset is configured as torchvision: box smooth-L1 beta 1/9. Eval: the FPN's P2-P6, the proposals, the detections and
their pasted masks. Training, with every anchor and every RoI sampled (a sampler batch larger than all of them, so
that the random draws do not matter): the five losses, every parameter's gradient, and the whole state (weights, BN
statistics) after two SGD steps. Where the two models' inits agree, a fresh model's tensors are drawn from the same
distributions as the twin's; the departures (model.py, roi_heads.py, masks.py) are asserted to differ.

Departures that these tests step around: exactly tied proposal scores may come in another order (ours a stable
sort, torchvision's is not), so proposals and detections are compared as sets (rows sorted by box); data.resized_size
rounds where torchvision floors, so the images here are given at the network's size and neither model resizes.
"""
import math

import pytest
import torch

from model import build_model, convert_torchvision_state_dict

tv = pytest.importorskip("torchvision")
from torchvision.models.detection.image_list import ImageList  # noqa: E402

from bench import build_torchvision_twin  # noqa: E402
from test_model import by_box  # noqa: E402

NUM_CLASSES = 3      # random weights score every class ~1/3 > 0.05: detections survive the score threshold
SIZES = [(128, 160), (112, 150)]   # the second image is padded into the 128 x 160 batch
EVERYTHING = 10 ** 6  # a sampler batch larger than all anchors and RoIs: every one is sampled, in index order
# Fewer proposals and detections than the preset's 1000 / 1000 / 100 keep the float64 4conv box head and mask head
# (~0.6 GFLOP per RoI) within seconds on 2 cores; torchvision's RPN is set to the same (its _post_nms_top_n).
PROPOSALS_TRAIN, PROPOSALS_TEST, DETECTIONS = 32, 60, 25
TWINS = {"r50_fpn_gn": torch.nn.GroupNorm, "r50_fpn_syncbn": torch.nn.BatchNorm2d}


def make_twins(preset, **overrides):
    """torchvision's twin of preset and ours with its weights, both float64, and a float64 batch."""
    torch.manual_seed(0)
    theirs, _ = build_torchvision_twin(preset, NUM_CLASSES, SIZES[0])
    theirs.rpn._post_nms_top_n = {"training": PROPOSALS_TRAIN, "testing": PROPOSALS_TEST}
    theirs.roi_heads.detections_per_img = DETECTIONS
    g = torch.Generator().manual_seed(1)
    norms = [m for m in theirs.modules() if isinstance(m, TWINS[preset])]
    with torch.no_grad():
        for m in norms:  # the norms' affines (init 1, 0), randomized
            m.weight.copy_(torch.rand(m.weight.shape, generator=g) + 0.5)
            m.bias.copy_(torch.randn(m.bias.shape, generator=g) * 0.2)
        theirs.rpn.head.cls_logits.weight.mul_(30)  # spread the objectness logits: distinct proposal scores
    images = torch.zeros(2, 3, *SIZES[0], dtype=torch.float64)
    torch.manual_seed(2)
    for img, (h, w) in zip(images, SIZES):
        img[:, :h, :w] = torch.randn(3, h, w, dtype=torch.float64)
    if preset == "r50_fpn_syncbn":  # BN's running statistics: one training pass's batch statistics (momentum 1),
        for m in norms:            # as eval on the initial mean 0 / variance 1 would let 16 residual blocks explode
            m.momentum = 1.0
        with torch.no_grad():
            theirs.train()
            features = theirs.backbone(images.float())
            proposals, _ = theirs.rpn(ImageList(images.float(), SIZES), features, targets())
            theirs.roi_heads(features, proposals, SIZES, targets())
        for m in norms:
            m.momentum = 0.1
    ours = build_model(preset, num_classes=NUM_CLASSES, box_loss_beta=1 / 9,  # torchvision's beta
                       rpn_post_nms_top_n_train=PROPOSALS_TRAIN, rpn_post_nms_top_n_test=PROPOSALS_TEST, **overrides)
    ours.roi_heads.detections_per_img = DETECTIONS
    ours.load_state_dict(convert_torchvision_state_dict(theirs.state_dict()), strict=True)
    theirs.double(), ours.double()
    return theirs, ours, images


def targets():
    """Two objects in the first image, one in the second, each mask a rectangle inside its box."""
    boxes = [torch.tensor([[10.0, 15.0, 90.0, 100.0], [70.0, 20.0, 150.0, 120.0]]),
             torch.tensor([[30.0, 5.0, 95.0, 60.0]])]
    result = []
    for (h, w), b, labels in zip(SIZES, boxes, ([1, 2], [2])):
        masks = torch.zeros(len(b), h, w, dtype=torch.uint8)
        for mask, (x1, y1, x2, y2) in zip(masks, b.int().tolist()):
            mask[y1 + 5:y2 - 5, x1:x2 - 10] = 1   # not the box itself: the targets' edges fall inside RoIs
        result.append({"boxes": b.double(), "labels": torch.tensor(labels), "masks": masks})
    return result


@pytest.mark.parametrize("preset", ["r50_fpn_gn", "r50_fpn_syncbn", "r50_fpn_frozenbn", "tv_maskrcnn_v1"])
def test_every_torchvision_tensor_is_converted(preset):
    theirs, _ = build_torchvision_twin(preset, NUM_CLASSES, SIZES[0])
    ours = build_model(preset, num_classes=NUM_CLASSES)
    converted = convert_torchvision_state_dict(theirs.state_dict())
    assert len(converted) == len(theirs.state_dict())  # no two tensors mapped onto one name
    ours.load_state_dict(converted, strict=True)  # nothing missing, nothing unexpected, every shape right
    assert all(torch.equal(ours.state_dict()[k], v) for k, v in converted.items() if k in ours.state_dict())


@pytest.mark.parametrize("preset", TWINS)
@torch.no_grad()
def test_inference_equals_torchvision_twin(preset):
    theirs, ours, images = make_twins(preset)
    theirs.eval(), ours.eval()
    features = theirs.backbone(images)
    tv_proposals, _ = theirs.rpn(ImageList(images, SIZES), features)
    tv_detections, _ = theirs.roi_heads(features, tv_proposals, SIZES)
    tv_probs = [d["masks"] for d in tv_detections]  # (D, 1, 28, 28) before pasting
    tv_detections = theirs.transform.postprocess(tv_detections, SIZES, SIZES)  # pastes the masks

    P = ours.features(images)
    assert len(P) == len(features) == 5
    # float64 outputs ~1e-13 apart (sums in other orders, measured); 1e-9 leaves room and no bug through
    for ours_p, tv_p in zip(P, features.values()):  # P2..P6
        torch.testing.assert_close(ours_p, tv_p, rtol=0, atol=1e-9)
    proposals, _ = ours.rpn(P, tuple(images.shape[-2:]), SIZES)
    for a, b in zip(proposals, tv_proposals):
        assert a.shape == b.shape == (PROPOSALS_TEST, 4)
        torch.testing.assert_close(a[by_box(a)], b[by_box(b)], rtol=0, atol=1e-9)
    detections = ours.roi_heads(P[:4], proposals, tuple(images.shape[-2:]), SIZES)
    pasted = ours.postprocess([dict(d) for d in detections], SIZES, SIZES)
    for ours_d, probs, tv_d, tv_p in zip(detections, pasted, tv_detections, tv_probs):
        assert len(ours_d["boxes"]) == DETECTIONS
        i, j = by_box(ours_d["boxes"]), by_box(tv_d["boxes"])
        assert torch.equal(ours_d["labels"][i], tv_d["labels"][j])
        torch.testing.assert_close(ours_d["boxes"][i], tv_d["boxes"][j], rtol=0, atol=1e-9)
        torch.testing.assert_close(ours_d["scores"][i], tv_d["scores"][j], rtol=0, atol=1e-9)
        torch.testing.assert_close(ours_d["mask_probs"][i], tv_p[j], rtol=0, atol=1e-9)
        assert probs["masks"].shape == tv_d["masks"].shape
        # pasting resizes in float32 (masks.paste_masks, fast_ops.paste_masks), torchvision in float64
        torch.testing.assert_close(probs["masks"][i].double(), tv_d["masks"][j], rtol=0, atol=1e-5)


@pytest.mark.parametrize("preset", TWINS)
def test_training_equals_torchvision_twin(preset):
    theirs, ours, images = make_twins(preset, rpn_batch_size_per_image=EVERYTHING,
                                      roi_batch_size_per_image=EVERYTHING)
    theirs.rpn.fg_bg_sampler.batch_size_per_image = EVERYTHING
    theirs.roi_heads.fg_bg_sampler.batch_size_per_image = EVERYTHING
    theirs.train(), ours.train()
    tv_params = convert_torchvision_state_dict(dict(theirs.named_parameters()))  # our names -> their parameters
    assert set(tv_params) == {name for name, _ in ours.named_parameters()}
    names = {"loss_objectness": "loss_rpn_cls", "loss_rpn_box_reg": "loss_rpn_box", "loss_classifier": "loss_cls",
             "loss_box_reg": "loss_box", "loss_mask": "loss_mask"}
    start = {name: p.detach().clone() for name, p in ours.named_parameters()}
    # LR 0.002: at 0.02 the random SyncBN model moves so fast that the float32 rounding below grows to 1e-4 in step 1
    ours_sgd = torch.optim.SGD(ours.parameters(), lr=0.002, momentum=0.9)
    tv_sgd = torch.optim.SGD(theirs.parameters(), lr=0.002, momentum=0.9)
    for step in range(2):
        image_list = ImageList(images, SIZES)
        features = theirs.backbone(images)
        tv_proposals, tv_rpn = theirs.rpn(image_list, features, targets())
        _, tv_roi = theirs.roi_heads(features, tv_proposals, SIZES, targets())
        losses = ours(images, SIZES, targets())
        assert set(losses) == set(names.values())
        for tv_name, value in {**tv_rpn, **tv_roi}.items():
            # step 0: float64 rounding (measured <= 1e-15); step 1: the objectness loss is float32 (below), a few
            # float32 ulps apart once the weights are
            torch.testing.assert_close(losses[names[tv_name]], value, rtol=1e-12 if step == 0 else 1e-6, atol=0)
        ours_sgd.zero_grad(), tv_sgd.zero_grad()
        sum(losses.values()).backward()
        sum({**tv_rpn, **tv_roi}.values()).backward()
        # Every parameter's gradient, at both steps, to 1e-5 of its norm. Not float64's ~1e-14: both models' RPN
        # objectness loss takes float32 anchor labels, and BCE-with-logits of a float64 input and a float32 target
        # is float32 (measured: 9e-9 at step 0, up to 3e-7 at step 1 for SyncBN); a wrong layer gives O(1).
        for name, p in ours.named_parameters():
            q = tv_params[name].grad
            assert p.grad is not None and q is not None and q.norm() > 0, name
            assert (p.grad - q).norm() < 1e-5 * q.norm(), (step, name)
        ours_sgd.step(), tv_sgd.step()
    # two SGD steps later: each parameter's change agrees to 1e-5 of itself, as the gradients do (measured 2e-7);
    # the buffers (BN's running statistics and counters) to 1e-6 of their norm
    state = convert_torchvision_state_dict(theirs.state_dict())
    assert set(state) == set(ours.state_dict())
    for name, value in ours.named_parameters():
        change, tv_change = value - start[name], state[name] - start[name]
        assert (change - tv_change).norm() < 1e-5 * tv_change.norm(), name
    for name, value in ours.named_buffers():  # BN's running statistics and counters
        assert (value - state[name]).double().norm() <= 1e-6 * state[name].double().norm(), name


# Our init against the twin's, tensor by tensor, where they follow the same rule; the departures, named.
DEPARTURES = {  # Detectron's init, against torchvision's nn.Linear / nn.Conv defaults (roi_heads.py, masks.py)
    "roi_heads.box_head.fcs.0.weight": "XavierFill U(+-sqrt(3 / fan_in)), torchvision U(+-sqrt(1 / fan_in))",
    "roi_heads.box_head.fcs.0.bias": "0, torchvision U(+-sqrt(1 / fan_in))",
    "roi_heads.box_predictor.cls_score.weight": "N(0, 0.01)", "roi_heads.box_predictor.cls_score.bias": "0",
    "roi_heads.box_predictor.bbox_pred.weight": "N(0, 0.001)", "roi_heads.box_predictor.bbox_pred.bias": "0",
    "roi_heads.mask_head.deconv.bias": "0", "roi_heads.mask_head.mask_logits.bias": "0",
}


def ks_distance(a, b):
    """Two-sample Kolmogorov-Smirnov statistic: the largest gap between the empirical CDFs of a and b."""
    a, b = a.flatten().double().sort().values, b.flatten().double().sort().values
    points = torch.cat([a, b])
    cdf_a = torch.searchsorted(a, points, right=True) / len(a)
    cdf_b = torch.searchsorted(b, points, right=True) / len(b)
    return (cdf_a - cdf_b).abs().max().item()


@pytest.mark.parametrize("preset", TWINS)
def test_init_follows_torchvision_except_the_named_departures(preset):
    torch.manual_seed(0)
    theirs = convert_torchvision_state_dict(build_torchvision_twin(preset, NUM_CLASSES, SIZES[0])[0].state_dict())
    ours = build_model(preset, num_classes=NUM_CLASSES).state_dict()
    assert set(ours) == set(theirs)
    for name, value in ours.items():
        tv_value = theirs[name]
        if not value.is_floating_point() or value.std() == 0 or tv_value.std() == 0:  # norms' 1 / 0, zero biases
            assert torch.equal(value, tv_value) != (name in DEPARTURES), name
            continue
        # Random tensors (their first 10^5 values, i.i.d.): the same distribution by a two-sample KS test at
        # significance 1e-6 (critical distance sqrt(-ln(1e-6 / 2) / 2 * 2 / n)); the departures must fail it
        n = min(value.numel(), 10 ** 5)
        same = ks_distance(value.flatten()[:n], tv_value.flatten()[:n]) < math.sqrt(-math.log(0.5e-6) / 2 * 2 / n)
        assert same != (name in DEPARTURES), (name, DEPARTURES.get(name))
