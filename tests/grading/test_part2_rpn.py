"""Part 2 (assignment.py): the RPN's anchors (Faster R-CNN Sec. 3.1.1, FPN Sec. 4.1), anchor matching (Sec. 3.1.2),
balanced sampling (Sec. 3.1.3) and the loss of Eq. 1.

The functions: rpn.cell_anchors, rpn.AnchorGenerator.forward, boxes.Matcher.__call__, boxes.BalancedSampler.__call__,
rpn.rpn_loss.
"""
import math

import torch
from torchvision.models.detection import _utils as tv_utils
from torchvision.models.detection import anchor_utils, rpn as tv_rpn
from torchvision.models.detection.image_list import ImageList

from boxes import BalancedSampler, Matcher
from grading import expect_close
from rpn import AnchorGenerator, cell_anchors, rpn_loss

BELOW, BETWEEN = Matcher.BELOW_LOW_THRESHOLD, Matcher.BETWEEN_THRESHOLDS


def test_cell_anchors_hand_worked():
    # area size**2 and h / w = ratio: w = size / sqrt(ratio), h = size * sqrt(ratio); corners +-w/2, +-h/2 rounded.
    # size 32, ratio 0.5: w = 45.25, h = 22.63 -> [-23, -11, 23, 11]
    expect_close(cell_anchors((32,), (0.5, 1.0, 2.0)), [[-23, -11, 23, 11], [-16, -16, 16, 16], [-11, -23, 11, 23]],
                 "cell_anchors(sizes=(32,), aspect_ratios=(0.5, 1, 2))")
    # ratio-major: every size of the first ratio, then every size of the next (16 at ratio 2: w 11.31, h 22.63)
    expect_close(cell_anchors((16, 32), (1.0, 2.0)), [[-8, -8, 8, 8], [-16, -16, 16, 16], [-6, -11, 6, 11],
                                                      [-11, -23, 11, 23]],
                 "cell_anchors(sizes=(16, 32), aspect_ratios=(1, 2)), ratio-major")


def test_anchors_are_location_major():
    # a 2 x 2 map of a 64 x 64 image: stride 32; the cell anchor [-8, -8, 8, 8] at (x, y) = (0, 0), (32, 0), (0, 32),
    # (32, 32), row by row
    anchors = AnchorGenerator(sizes=(16,), aspect_ratios=(1.0,))((64, 64), [(2, 2)], "cpu", torch.float32)
    assert isinstance(anchors, list) and len(anchors) == 1, "AnchorGenerator returns a list with one tensor per level"
    expect_close(anchors[0], [[-8, -8, 8, 8], [24, -8, 40, 8], [-8, 24, 8, 40], [24, 24, 40, 40]],
                 "the anchors of a 2 x 2 map at stride 32, location by location")


def test_anchors_match_torchvision():
    sizes, ratios = ((16, 32), (64, 128), (256, 512)), (0.5, 1.0, 2.0)  # two sizes on each of three levels
    image_shape, feature_shapes = (96, 128), [(24, 32), (12, 16), (6, 8)]
    ours = AnchorGenerator(sizes, ratios)(image_shape, feature_shapes, "cpu", torch.float32)
    images = ImageList(torch.zeros(1, 3, *image_shape), [image_shape])
    theirs = anchor_utils.AnchorGenerator(sizes, (ratios,) * 3)(images, [torch.zeros(1, 1, *s) for s in feature_shapes])
    expect_close(torch.cat(ours), theirs[0], "the anchors of three levels, concatenated, as torchvision's")


def iou_example():
    # two ground-truth boxes (rows) against five anchors (columns)
    return torch.tensor([[0.80, 0.50, 0.10, 0.20, 0.00],
                         [0.10, 0.60, 0.20, 0.25, 0.35]])


def test_matcher_hand_worked():
    # best gt per anchor: 0.80 (gt 0) matched; 0.60 and 0.35 between 0.3 and 0.7; 0.20 and 0.25 below 0.3
    expect_close(Matcher(0.7, 0.3)(iou_example()), [0, BETWEEN, BELOW, BELOW, BETWEEN], "Matcher(0.7, 0.3)")
    # rule (i): gt 1's best anchor (column 1, IoU 0.60) is matched to it even below 0.7
    expect_close(Matcher(0.7, 0.3, allow_low_quality_matches=True)(iou_example()), [0, 1, BELOW, BELOW, BETWEEN],
                 "Matcher(0.7, 0.3, allow_low_quality_matches=True)")
    # anchor 0 is gt 0's best (0.5) but its own best gt is gt 1 (0.6): a low-quality match gives it gt 1
    expect_close(Matcher(0.7, 0.3, allow_low_quality_matches=True)(torch.tensor([[0.5, 0.2], [0.6, 0.1]])),
                 [1, BELOW], "a low-quality match goes to the anchor's own best gt")
    # thresholds are inclusive from below: IoU 0.7 matches, IoU 0.3 is between
    expect_close(Matcher(0.7, 0.3)(torch.tensor([[0.7, 0.3, 0.2999]])), [0, BETWEEN, BELOW], "IoU at the thresholds")


def test_matcher_matches_torchvision():
    iou = torch.rand(4, 50, generator=torch.Generator().manual_seed(0))
    iou[:, 7] = iou[:, 3]  # equal columns: ties for a gt's best anchor must all be kept
    for low_quality in (False, True):
        theirs = tv_utils.Matcher(0.7, 0.3, allow_low_quality_matches=low_quality)(iou)
        expect_close(Matcher(0.7, 0.3, allow_low_quality_matches=low_quality)(iou), theirs,
                     f"Matcher(0.7, 0.3, allow_low_quality_matches={low_quality}), as torchvision's Matcher")


def check_sample(labels, pos, neg, num_pos, num_neg):
    assert pos.numel() == num_pos and neg.numel() == num_neg, (
        f"expected {num_pos} positives and {num_neg} negatives, got {pos.numel()} and {neg.numel()}")
    assert len(set(pos.tolist())) == num_pos and len(set(neg.tolist())) == num_neg, "an index was sampled twice"
    assert (labels[pos] == 1).all() and (labels[neg] == 0).all(), "a sampled index has the wrong label (-1: ignore)"


def test_balanced_sampler_hand_worked():
    torch.manual_seed(0)
    labels = torch.tensor([1, 1, 1] + [0] * 10 + [-1, -1])
    pos, neg = BalancedSampler(8, 0.5)(labels)  # up to 4 positives; only 3 exist, so 5 negatives fill the batch
    check_sample(labels, pos, neg, 3, 5)
    labels = torch.tensor([1] * 10 + [0] * 2 + [-1] * 5)
    pos, neg = BalancedSampler(8, 0.5)(labels)  # 4 of the 10 positives; both negatives
    check_sample(labels, pos, neg, 4, 2)


def test_balanced_sampler_draws_as_torchvision():
    # the same random calls as torchvision: randperm over the positives, then over the negatives
    labels = torch.randint(-1, 2, (300,), generator=torch.Generator().manual_seed(1))
    torch.manual_seed(2)
    pos, neg = BalancedSampler(64, 0.25)(labels)
    torch.manual_seed(2)
    pos_mask, neg_mask = tv_utils.BalancedPositiveNegativeSampler(64, 0.25)([labels])
    expect_close(torch.sort(pos).values, torch.where(pos_mask[0])[0], "the sampled positives, as torchvision's")
    expect_close(torch.sort(neg).values, torch.where(neg_mask[0])[0], "the sampled negatives, as torchvision's")


def test_rpn_loss_hand_worked():
    objectness = torch.tensor([0.0, 0.0, 2.0, -1.0, 5.0, 0.0])
    labels = torch.tensor([1.0, 0.0, 1.0, 0.0, -1.0, 0.0])
    pos, neg = torch.tensor([0, 2]), torch.tensor([1, 3])  # anchor 4 is ignored, anchor 5 was not sampled
    deltas = torch.zeros(6, 4)
    gt_deltas = torch.tensor([[1.0, 0, 0, 0], [0.05, 0, 0, 0]])
    loss_cls, loss_box = rpn_loss(objectness, deltas, labels, pos, neg, gt_deltas)
    # binary cross-entropy: log 2 for a logit of 0, log(1 + e^-2) for logit 2 and label 1, log(1 + e^-1) for logit -1
    # and label 0; the mean over the 4 sampled anchors
    expect_close(loss_cls, (2 * math.log(2) + math.log(1 + math.exp(-2)) + math.log(1 + math.exp(-1))) / 4,
                 "loss_rpn_cls, the mean binary cross-entropy over the sampled anchors")
    # smooth L1 with beta = 1/9: |d| - beta / 2 for |d| >= beta (1 - 1/18), 0.5 d^2 / beta below it (0.01125);
    # summed over the positives, divided by the 4 sampled anchors
    expect_close(loss_box, (1 - 1 / 18 + 0.01125) / 4, "loss_rpn_box, smooth L1 (beta 1/9) / sampled anchors")


def test_rpn_loss_matches_torchvision():
    g = torch.Generator().manual_seed(3)
    objectness, deltas = torch.randn(200, generator=g), torch.randn(200, 4, generator=g)
    labels = torch.randint(-1, 2, (200,), generator=g).float()
    targets = torch.randn(200, 4, generator=g)
    # a batch larger than all anchors: torchvision samples every positive and negative, no randomness left
    theirs = tv_rpn.RegionProposalNetwork(None, None, 0.7, 0.3, 10_000, 0.5, {}, {}, 0.7)
    tv_cls, tv_box = theirs.compute_loss(objectness[:, None], deltas, [labels], [targets])
    pos, neg = torch.where(labels == 1)[0], torch.where(labels == 0)[0]
    loss_cls, loss_box = rpn_loss(objectness, deltas, labels, pos, neg, targets[pos])
    expect_close(loss_cls, tv_cls, "loss_rpn_cls, as torchvision's loss_objectness")
    expect_close(loss_box, tv_box, "loss_rpn_box, as torchvision's loss_rpn_box_reg")
