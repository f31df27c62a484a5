"""rpn.py against torchvision's AnchorGenerator and RegionProposalNetwork, plus hand-worked anchors."""
from collections import OrderedDict

import pytest
import torch

from rpn import RPN, AnchorGenerator, RPNHead

tv = pytest.importorskip("torchvision")
from torchvision.models.detection import anchor_utils as tv_anchor_utils  # noqa: E402
from torchvision.models.detection import rpn as tv_rpn  # noqa: E402
from torchvision.models.detection.image_list import ImageList  # noqa: E402

IMAGE_SHAPE = (128, 160)  # padded batch
IMAGE_SIZES = [(128, 160), (100, 120)]
FEATURE_SHAPES = [(32, 40), (16, 20), (8, 10), (4, 5), (2, 3)]  # P2..P6 (strides 4..64; P6 rounds up like max_pool)
CHANNELS = 16


def test_cell_anchors_hand_worked():
    # size 32, h/w = 0.5: w = 32 * sqrt(2) = 45.25, h = 22.63 -> half-sides 22.63 and 11.31, rounded to 23 and 11
    anchors = AnchorGenerator(sizes=(32,), aspect_ratios=(0.5, 1.0, 2.0))((32, 32), [(1, 1)], "cpu", torch.float32)
    assert anchors[0].tolist() == [[-23, -11, 23, 11], [-16, -16, 16, 16], [-11, -23, 11, 23]]


def test_anchor_order_is_location_major():
    # a 2x2 grid at stride 16: x moves fastest, then y; one anchor per location here
    anchors = AnchorGenerator(sizes=(32,), aspect_ratios=(1.0,))((32, 32), [(2, 2)], "cpu", torch.float32)
    assert anchors[0].tolist() == [[-16, -16, 16, 16], [0, -16, 32, 16], [-16, 0, 16, 32], [0, 0, 32, 32]]


def test_anchors_match_torchvision():
    sizes = (32, 64, 128, 256, 512)
    ours = AnchorGenerator(sizes, (0.5, 1.0, 2.0))(IMAGE_SHAPE, FEATURE_SHAPES, "cpu", torch.float32)
    features = [torch.zeros(2, 1, h, w) for h, w in FEATURE_SHAPES]
    images = ImageList(torch.zeros(2, 3, *IMAGE_SHAPE), IMAGE_SIZES)
    theirs = tv_anchor_utils.AnchorGenerator(tuple((s,) for s in sizes), ((0.5, 1.0, 2.0),) * 5)(images, features)
    assert len(theirs) == 2  # torchvision returns the same anchors once per image
    for per_image in theirs:
        assert torch.equal(torch.cat(ours), per_image)


def make_pair(plain_ops=False, **kw):
    """Our RPN and a torchvision RegionProposalNetwork with the same settings and the same head weights.
    plain_ops: ours selects proposals with its per-image loop instead of fast_ops.select_proposals."""
    ours = RPN(in_channels=CHANNELS, **kw)
    ours.plain_ops = plain_ops
    g = torch.Generator().manual_seed(0)
    for p in ours.head.parameters():  # larger than the N(0, 0.01) init so that deltas and scores spread out
        p.data = torch.randn(p.shape, generator=g) * 0.2
    head = tv_rpn.RPNHead(CHANNELS, 3)
    head.conv[0][0].weight.data.copy_(ours.head.conv.weight)
    head.conv[0][0].bias.data.copy_(ours.head.conv.bias)
    for name in ("cls_logits", "bbox_pred"):
        getattr(head, name).load_state_dict(getattr(ours.head, name).state_dict())
    anchors = tv_anchor_utils.AnchorGenerator(((32,), (64,), (128,), (256,), (512,)), ((0.5, 1.0, 2.0),) * 5)
    theirs = tv_rpn.RegionProposalNetwork(
        anchors, head, fg_iou_thresh=0.7, bg_iou_thresh=0.3,
        batch_size_per_image=kw.get("batch_size_per_image", 256), positive_fraction=0.5,
        pre_nms_top_n={"training": kw.get("pre_nms_top_n_train", 2000), "testing": kw.get("pre_nms_top_n_test", 1000)},
        post_nms_top_n={"training": kw.get("post_nms_top_n_train", 2000),
                        "testing": kw.get("post_nms_top_n_test", 1000)},
        nms_thresh=0.7)
    return ours, theirs


def make_inputs(seed=1):
    g = torch.Generator().manual_seed(seed)
    features = [torch.randn(2, CHANNELS, h, w, generator=g) for h, w in FEATURE_SHAPES]
    targets = [{"boxes": torch.tensor([[10.0, 20.0, 60.0, 90.0], [70.0, 5.0, 150.0, 40.0], [30.0, 30.0, 45.0, 42.0]])},
               {"boxes": torch.zeros((0, 4))}]  # the second image has no objects: all its anchors are negatives
    return features, targets


def run_torchvision(rpn, features, targets=None):
    images = ImageList(torch.zeros(2, 3, *IMAGE_SHAPE), IMAGE_SIZES)
    return rpn(images, OrderedDict((f"P{i + 2}", f) for i, f in enumerate(features)), targets)


def test_head_shapes_and_init():
    head = RPNHead(in_channels=CHANNELS, num_anchors=3)
    objectness, deltas = head([torch.randn(2, CHANNELS, 8, 10), torch.randn(2, CHANNELS, 4, 5)])
    assert [o.shape for o in objectness] == [(2, 3, 8, 10), (2, 3, 4, 5)]
    assert [d.shape for d in deltas] == [(2, 12, 8, 10), (2, 12, 4, 5)]
    assert head.bbox_pred.weight.std().item() == pytest.approx(0.01, rel=0.2)
    assert head.cls_logits.bias.abs().max().item() == 0


@pytest.mark.parametrize("plain_ops", [False, True], ids=["fast", "plain"])
def test_eval_proposals_match_torchvision(plain_ops):
    ours, theirs = make_pair(plain_ops, pre_nms_top_n_test=1000, post_nms_top_n_test=1000)
    ours.eval(), theirs.eval()
    features, targets = make_inputs()
    with torch.no_grad():
        proposals, losses = ours(features, IMAGE_SHAPE, IMAGE_SIZES, targets)
        expected, _ = run_torchvision(theirs, features)
    assert losses == {}
    for p, e, (h, w) in zip(proposals, expected, IMAGE_SIZES):
        assert 0 < p.shape[0] <= 1000
        assert torch.equal(p, e)
        assert p[:, 2].max() <= w and p[:, 3].max() <= h  # clipped to the real (unpadded) image


@pytest.mark.parametrize("plain_ops", [False, True], ids=["fast", "plain"])
def test_train_proposals_and_losses_match_torchvision(plain_ops):
    # torchvision's training settings (2000 / 2000); P2 has 3840 anchors per image, so top-k really cuts
    ours, theirs = make_pair(plain_ops, pre_nms_top_n_train=2000, post_nms_top_n_train=2000)
    ours.train(), theirs.train()
    features, targets = make_inputs()
    features = [f.requires_grad_() for f in features]
    torch.manual_seed(0)  # the same random calls: one randperm for positives, one for negatives, per image
    proposals, losses = ours(features, IMAGE_SHAPE, IMAGE_SIZES, targets)
    torch.manual_seed(0)
    expected, tv_losses = run_torchvision(theirs, features, targets)
    for p, e in zip(proposals, expected):
        assert torch.equal(p, e)
        assert not p.requires_grad  # Faster R-CNN Sec. 3.2: no gradient through the proposals
    torch.testing.assert_close(losses["loss_rpn_cls"], tv_losses["loss_objectness"])
    torch.testing.assert_close(losses["loss_rpn_box"], tv_losses["loss_rpn_box_reg"])
    assert losses["loss_rpn_box"] > 0
    # and the same gradients into the head
    (losses["loss_rpn_cls"] + losses["loss_rpn_box"]).backward()
    (tv_losses["loss_objectness"] + tv_losses["loss_rpn_box_reg"]).backward()
    torch.testing.assert_close(ours.head.conv.weight.grad, theirs.head.conv[0][0].weight.grad)
    torch.testing.assert_close(ours.head.bbox_pred.weight.grad, theirs.head.bbox_pred.weight.grad)


def test_losses_match_torchvision_when_every_anchor_is_sampled():
    # a batch larger than the number of anchors: every positive and negative is used, so no randomness is involved
    ours, theirs = make_pair(batch_size_per_image=100_000)
    ours.train(), theirs.train()
    features, targets = make_inputs(seed=2)
    _, losses = ours(features, IMAGE_SHAPE, IMAGE_SIZES, targets)
    _, tv_losses = run_torchvision(theirs, features, targets)
    torch.testing.assert_close(losses["loss_rpn_cls"], tv_losses["loss_objectness"])
    torch.testing.assert_close(losses["loss_rpn_box"], tv_losses["loss_rpn_box_reg"])


def test_only_negatives_without_objects():
    # with no ground truth anywhere, there is no box loss and objectness is pushed down on 256 sampled anchors
    rpn = RPN(in_channels=CHANNELS).train()
    features, _ = make_inputs()
    _, losses = rpn(features, IMAGE_SHAPE, IMAGE_SIZES, [{"boxes": torch.zeros((0, 4))}] * 2)
    assert losses["loss_rpn_box"].item() == 0
    # zero logits at init (bias 0, tiny weights): BCE of ~0 logits against label 0 is ~log 2
    assert losses["loss_rpn_cls"].item() == pytest.approx(torch.log(torch.tensor(2.0)).item(), abs=0.05)
    assert losses["loss_rpn_cls"].requires_grad


def test_no_losses_without_targets():
    rpn = RPN(in_channels=CHANNELS).train()
    features, _ = make_inputs()
    proposals, losses = rpn(features, IMAGE_SHAPE, IMAGE_SIZES)
    assert losses == {} and len(proposals) == 2
    assert all(p.shape[1] == 4 and p.shape[0] <= 1000 and not p.requires_grad for p in proposals)


def test_several_sizes_on_one_level_hand_worked():
    # Faster R-CNN Sec. 3.1.1: 3 sizes x 3 ratios = 9 anchors per location, ratio-major. Ratio 0.5 at size 128:
    # w = 128 * sqrt(2) = 181.02, h = 90.51 -> half-sides 90.51 and 45.25, rounded to 91 and 45.
    gen = AnchorGenerator(sizes=((128, 256, 512),), aspect_ratios=(0.5, 1.0, 2.0))
    assert gen.num_anchors_per_location() == 9
    (anchors,) = gen((32, 32), [(1, 1)], "cpu", torch.float32)
    assert anchors[:4].tolist() == [[-91, -45, 91, 45], [-181, -91, 181, 91], [-362, -181, 362, 181],
                                    [-64, -64, 64, 64]]
    with pytest.raises(AssertionError, match="as many anchor sizes"):
        AnchorGenerator(sizes=((32, 64), (128,)))


def single_level_pair(**kw):
    """One stride-16 level with 9 anchors (VGG-16 Faster R-CNN): ours and torchvision's RPN, same head weights."""
    sizes, ratios = (128, 256, 512), (0.5, 1.0, 2.0)
    ours = RPN(in_channels=CHANNELS, anchor_sizes=(sizes,), aspect_ratios=ratios, **kw)
    g = torch.Generator().manual_seed(0)
    for p in ours.head.parameters():
        p.data = torch.randn(p.shape, generator=g) * 0.2
    head = tv_rpn.RPNHead(CHANNELS, 9)
    head.conv[0][0].load_state_dict(ours.head.conv.state_dict())
    for name in ("cls_logits", "bbox_pred"):
        getattr(head, name).load_state_dict(getattr(ours.head, name).state_dict())
    theirs = tv_rpn.RegionProposalNetwork(
        tv_anchor_utils.AnchorGenerator((sizes,), (ratios,)), head, fg_iou_thresh=0.7, bg_iou_thresh=0.3,
        batch_size_per_image=kw.get("batch_size_per_image", 256), positive_fraction=0.5,
        pre_nms_top_n={"training": 2000, "testing": 1000}, post_nms_top_n={"training": 1000, "testing": 1000},
        nms_thresh=0.7)
    return ours, theirs


def test_several_sizes_on_one_level_match_torchvision():
    shape = (IMAGE_SHAPE[0] // 16, IMAGE_SHAPE[1] // 16)  # conv5_3 of the padded batch
    ours, theirs = single_level_pair(batch_size_per_image=100_000)  # every anchor sampled: no randomness
    features, targets = make_inputs()
    features = [torch.randn(2, CHANNELS, *shape, generator=torch.Generator().manual_seed(3))]
    images = ImageList(torch.zeros(2, 3, *IMAGE_SHAPE), IMAGE_SIZES)
    ours_anchors = ours.anchor_generator(IMAGE_SHAPE, [shape], "cpu", torch.float32)
    assert torch.equal(ours_anchors[0], theirs.anchor_generator(images, features)[0])
    assert ours_anchors[0].shape == (shape[0] * shape[1] * 9, 4)

    ours.train(), theirs.train()
    proposals, losses = ours(features, IMAGE_SHAPE, IMAGE_SIZES, targets)
    expected, tv_losses = theirs(images, OrderedDict(C5=features[0]), targets)
    torch.testing.assert_close(losses["loss_rpn_cls"], tv_losses["loss_objectness"])
    torch.testing.assert_close(losses["loss_rpn_box"], tv_losses["loss_rpn_box_reg"])
    assert losses["loss_rpn_box"] > 0
    ours.eval(), theirs.eval()
    with torch.no_grad():
        proposals, _ = ours(features, IMAGE_SHAPE, IMAGE_SIZES)
        expected, _ = theirs(images, OrderedDict(C5=features[0]))
    for p, e in zip(proposals, expected):
        assert p.shape[0] > 10 and torch.equal(p, e)
