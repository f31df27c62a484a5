"""Part 4 (assignment.py): the box head's loss (Fast R-CNN Eq. 1), the mask loss L_mask (Mask R-CNN Sec. 3) and
pasting the predicted masks into the image (Mask R-CNN Sec. 3.1).

The functions: roi_heads.fast_rcnn_loss, masks.mask_loss, masks.paste_masks.
"""
import math

import torch
from torchvision.models.detection.roi_heads import (fastrcnn_loss, maskrcnn_loss, paste_masks_in_image,
                                                    project_masks_on_boxes)

from grading import expect_close
from masks import mask_loss, paste_masks
from roi_heads import fast_rcnn_loss


def test_fast_rcnn_loss_hand_worked():
    # 3 RoIs of classes 0 (background), 1 and 2, of K = 3 classes with 4 deltas each
    logits = torch.zeros(3, 3)  # uniform: cross-entropy log 3 for every RoI
    deltas = torch.full((3, 3, 4), 9.0)  # the columns of the other classes must not count
    deltas[1, 1] = torch.tensor([2.0, 0, 0, 0])  # RoI 1, its class 1
    deltas[2, 2] = torch.tensor([0.0, 0, 0, 0])  # RoI 2, its class 2
    targets = torch.tensor([[5.0, 5, 5, 5], [0, 0, 0, 0], [0.5, 0, 0, 0]])  # background's target is never used
    loss_cls, loss_box = fast_rcnn_loss(logits, deltas.reshape(3, 12), torch.tensor([0, 1, 2]), targets)
    expect_close(loss_cls, math.log(3), "loss_cls, the mean cross-entropy of uniform logits over 3 classes")
    # smooth L1 (beta 1): |2| - 0.5 = 1.5 for RoI 1, 0.5 * 0.5^2 = 0.125 for RoI 2; divided by all 3 RoIs
    expect_close(loss_box, (1.5 + 0.125) / 3, "loss_box over the foreground RoIs' own class deltas / 3 RoIs")


def test_fast_rcnn_loss_class_agnostic():
    # deltas (R, 4): one box for every class (Cascade R-CNN); the foreground RoIs use it whatever their class
    deltas = torch.tensor([[1.0, 0, 0, 0], [0.0, 2.0, 0, 0]])
    loss_cls, loss_box = fast_rcnn_loss(torch.zeros(2, 4), deltas, torch.tensor([3, 0]), torch.zeros(2, 4))
    expect_close(loss_box, 0.5 / 2, "loss_box with class-agnostic deltas (R, 4): 0.5 for RoI 0, background ignored")


def test_fast_rcnn_loss_matches_torchvision():
    g = torch.Generator().manual_seed(0)
    logits, deltas = torch.randn(40, 5, generator=g), torch.randn(40, 20, generator=g)
    labels, targets = torch.randint(0, 5, (40,), generator=g), torch.randn(40, 4, generator=g)
    tv_cls, tv_box = fastrcnn_loss(logits, deltas, [labels[:15], labels[15:]], [targets[:15], targets[15:]])
    loss_cls, loss_box = fast_rcnn_loss(logits, deltas, labels, targets, beta=1 / 9)  # torchvision's beta
    expect_close(loss_cls, tv_cls, "loss_cls, as torchvision's fastrcnn_loss")
    expect_close(loss_box, tv_box, "loss_box with beta 1/9, as torchvision's fastrcnn_loss")


def test_mask_loss_hand_worked():
    logits = torch.full((2, 3, 2, 2), 100.0)  # classes other than the GT's must not count
    logits[0, 1] = 0.0  # RoI 0, its class 1: binary cross-entropy log 2 whatever the target
    logits[1, 2] = torch.tensor([[2.0, -2.0], [0.0, 0.0]])  # RoI 1, its class 2
    targets = torch.tensor([[[1.0, 0.0], [1.0, 1.0]], [[1.0, 0.0], [0.5, 0.5]]])
    # RoI 1: log(1 + e^-2) for (2, target 1) and for (-2, target 0), log 2 for (0, 0.5) twice; mean over 8 pixels
    expected = (4 * math.log(2) + 2 * math.log(1 + math.exp(-2)) + 2 * math.log(2)) / 8
    expect_close(mask_loss(logits, torch.tensor([1, 2]), targets), expected, "L_mask of 2 RoIs with 2 x 2 masks")


def test_mask_loss_without_positive_rois_is_a_zero_with_a_gradient():
    logits = torch.zeros(0, 3, 28, 28, requires_grad=True)
    loss = mask_loss(logits, torch.zeros(0, dtype=torch.int64), torch.zeros(0, 28, 28))
    expect_close(loss, 0.0, "L_mask of no RoIs")
    loss.backward()  # a graph that reaches the mask head, so that every process of a distributed run backpropagates


def test_mask_loss_matches_torchvision():
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(7, 4, 14, 14, generator=g)
    gt_masks = (torch.rand(3, 40, 50, generator=g) > 0.5).float()
    gt_labels = torch.tensor([1, 3, 2])
    proposals = torch.tensor([[2.0, 3, 30, 25], [0, 0, 49, 39], [10, 10, 20, 35], [5, 5, 6, 6], [20, 0, 45, 20],
                              [1, 30, 15, 39], [8, 2, 40, 38]])
    matched = torch.tensor([0, 1, 2, 0, 1, 2, 2])
    targets = project_masks_on_boxes(gt_masks, proposals, matched, 14)
    theirs = maskrcnn_loss(logits, [proposals], [gt_masks], [gt_labels], [matched])
    expect_close(mask_loss(logits, gt_labels[matched], targets), theirs, "L_mask, as torchvision's maskrcnn_loss")


def test_paste_masks_matches_torchvision():
    g = torch.Generator().manual_seed(2)
    masks = torch.rand(5, 1, 28, 28, generator=g)
    boxes = torch.tensor([[4.0, 6, 30, 40], [0, 0, 59, 47], [-10, -5, 12, 9], [50.5, 20.2, 70, 60], [20, 20, 21, 22]])
    expect_close(paste_masks(masks, boxes, (48, 60)), paste_masks_in_image(masks, boxes, (48, 60), padding=1),
                 "paste_masks of 5 masks into a 48 x 60 image, as torchvision's paste_masks_in_image(padding=1)")


def test_paste_masks_of_a_full_mask():
    pasted = paste_masks(torch.ones(1, 1, 28, 28), torch.tensor([[10.0, 10.0, 20.0, 30.0]]), (40, 40))
    assert isinstance(pasted, torch.Tensor) and pasted.shape == (1, 1, 40, 40), (
        f"paste_masks into a 40 x 40 image: expected shape (1, 1, 40, 40), got {getattr(pasted, 'shape', pasted)}")
    expect_close(pasted[0, 0, 12:28, 12:18], torch.ones(16, 6), "a full mask pasted: 1 inside its box")
    expect_close(pasted[0, 0, 33:, :], torch.zeros(7, 40), "a full mask pasted: 0 away from its box")
