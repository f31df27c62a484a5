"""Part 1 (assignment.py): IoU, box encoding and decoding (Faster R-CNN Eq. 2), greedy NMS (Sec. 3.3).

The functions: boxes.box_iou, boxes.BoxCoder.encode, boxes.BoxCoder.decode, boxes.nms.
"""
import math

import torch
import torchvision
from torchvision.models.detection._utils import BoxCoder as TorchvisionBoxCoder

from boxes import BoxCoder, box_iou, nms
from grading import expect_close


def random_boxes(n, seed, size=100.0):
    g = torch.Generator().manual_seed(seed)
    xy = torch.rand(n, 2, generator=g) * size
    wh = torch.rand(n, 2, generator=g) * size / 3 + 1
    return torch.cat([xy, xy + wh], dim=1)  # (n, 4) x1, y1, x2, y2 with x2 > x1, y2 > y1


def test_box_iou_hand_worked():
    a, b, c, d = [0, 0, 2, 2], [1, 1, 3, 3], [2, 0, 4, 2], [0, 0, 4, 4]
    iou = box_iou(torch.tensor([a, d], dtype=torch.float32), torch.tensor([a, b, c], dtype=torch.float32))
    # a with a: 1. a with b: intersection 1 (the square [1,2]x[1,2]), union 4 + 4 - 1 = 7. a with c: they only touch.
    # d (area 16) holds a, b and c (area 4 each): 4 / 16.
    expect_close(iou, [[1, 1 / 7, 0], [0.25, 0.25, 0.25]], "box_iou([a, d], [a, b, c]), an (N, M) = (2, 3) matrix")


def test_box_iou_matches_torchvision():
    boxes1, boxes2 = random_boxes(6, seed=0), random_boxes(9, seed=1)
    expect_close(box_iou(boxes1, boxes2), torchvision.ops.box_iou(boxes1, boxes2), "box_iou of random boxes, as "
                 "torchvision.ops.box_iou")


def test_encode_hand_worked():
    ref = torch.tensor([[0.0, 0, 10, 20], [0, 0, 10, 20]])  # centre (5, 10), w 10, h 20
    gt = torch.tensor([[2.0, 4, 12, 24], [0, 0, 20, 40]])  # centres (7, 14) and (10, 20); sizes 10x20 and 20x40
    # Eq. 2: t_x = (x - x_a) / w_a, t_y = (y - y_a) / h_a, t_w = log(w / w_a), t_h = log(h / h_a)
    expected = [[0.2, 0.2, 0.0, 0.0], [0.5, 0.5, math.log(2), math.log(2)]]
    expect_close(BoxCoder().encode(gt, ref), expected, "BoxCoder().encode(gt, ref), Eq. 2 with weights 1")
    # the box head's weights (10, 10, 5, 5) multiply the four deltas
    weighted = [[2.0, 2.0, 0.0, 0.0], [5.0, 5.0, 5 * math.log(2), 5 * math.log(2)]]
    expect_close(BoxCoder(weights=(10.0, 10.0, 5.0, 5.0)).encode(gt, ref), weighted,
                 "BoxCoder(weights=(10, 10, 5, 5)).encode(gt, ref)")


def test_decode_hand_worked_and_clamped():
    ref = torch.tensor([[0.0, 0, 10, 20]] * 3)
    deltas = torch.tensor([[0.0, 0, 0, 0], [0.5, 0.5, math.log(2), math.log(2)], [0, 0, 10.0, 0]])
    # zero deltas give the reference box back; Eq. 2 inverted gives the 20x40 box centred at (10, 20);
    # t_w = 10 is clamped to log(1000 / 16) before exp(): the width is 10 * 1000 / 16 = 625 around x = 5
    expected = [[0, 0, 10, 20], [0, 0, 20, 40], [5 - 312.5, 0, 5 + 312.5, 20]]
    expect_close(BoxCoder().decode(deltas, ref), expected, "BoxCoder().decode(deltas, ref)")
    # bf16 deltas (autocast) are decoded in float32: bf16's 8-bit mantissa would move the corners by pixels
    boxes = BoxCoder().decode(deltas.bfloat16(), ref.bfloat16())
    assert boxes.dtype == torch.float32, f"decode of bf16 deltas: expected float32 boxes, got {boxes.dtype}"


def test_encode_decode_match_torchvision():
    weights = (10.0, 10.0, 5.0, 5.0)
    ref, gt = random_boxes(20, seed=2), random_boxes(20, seed=3)
    theirs = TorchvisionBoxCoder(weights, bbox_xform_clip=math.log(1000 / 16))
    ours = BoxCoder(weights=weights)
    expect_close(ours.encode(gt, ref), theirs.encode_single(gt, ref), "BoxCoder.encode, as torchvision's encode_single")
    deltas = torch.randn(20, 4, generator=torch.Generator().manual_seed(4))
    expect_close(ours.decode(deltas, ref), theirs.decode_single(deltas, ref),
                 "BoxCoder.decode of random deltas, as torchvision's decode_single", atol=1e-4)
    expect_close(ours.decode(ours.encode(gt, ref), ref), gt, "decode(encode(gt, ref), ref) == gt", atol=1e-4)


def test_decode_keeps_class_specific_shape():
    # the box head predicts one box per class: deltas (R, K, 4) decode to boxes (R, K, 4), each class like (R, 4)
    ref = random_boxes(5, seed=5)
    deltas = torch.randn(5, 3, 4, generator=torch.Generator().manual_seed(6)) * 0.3
    boxes = BoxCoder().decode(deltas, ref)
    assert isinstance(boxes, torch.Tensor) and boxes.shape == (5, 3, 4), (
        f"decode of (5, 3, 4) deltas: expected boxes of shape (5, 3, 4), got {getattr(boxes, 'shape', boxes)}")
    for k in range(3):
        expect_close(boxes[:, k], BoxCoder().decode(deltas[:, k], ref), f"decode of (R, K, 4) deltas, class {k}")


def test_nms_hand_worked():
    A, B, C = [0.0, 0, 10, 10], [1.0, 0, 11, 10], [20.0, 20, 30, 30]
    boxes, scores = torch.tensor([C, A, B]), torch.tensor([0.7, 0.9, 0.8])
    # IoU(A, B) = 90 / 110 = 0.82: at 0.5, A (the best) suppresses B; C overlaps nothing. Indices by decreasing score.
    expect_close(nms(boxes, scores, 0.5), [1, 0], "nms at IoU 0.5: keep A (index 1), then C (index 0)")
    expect_close(nms(boxes, scores, 0.9), [1, 2, 0], "nms at IoU 0.9: nothing overlaps that much, all by score")
    # an IoU equal to the threshold does not suppress (only IoU > threshold does): 50 / 100 = 0.5
    half = torch.tensor([[0.0, 0, 10, 10], [0.0, 0, 10, 5]])
    expect_close(nms(half, torch.tensor([0.9, 0.8]), 0.5), [0, 1], "nms of two boxes with IoU exactly 0.5 at 0.5")


def test_nms_keeps_tied_scores_in_input_order():
    # 40 boxes that do not overlap, all of score 0.5: nothing is suppressed, and a stable sort keeps them in order
    boxes = torch.tensor([[10.0 * i, 0, 10.0 * i + 5, 5] for i in range(40)])
    expect_close(nms(boxes, torch.full((40,), 0.5), 0.5), torch.arange(40),
                 "nms of 40 disjoint boxes of equal score: all kept, in input order (a stable sort)")


def test_nms_matches_torchvision():
    for seed, threshold in [(7, 0.3), (8, 0.5), (9, 0.7)]:
        boxes = random_boxes(200, seed=seed)
        scores = torch.rand(200, generator=torch.Generator().manual_seed(seed))
        expect_close(nms(boxes, scores, threshold), torchvision.ops.nms(boxes, scores, threshold),
                     f"nms of 200 random boxes at IoU {threshold}, as torchvision.ops.nms")


def test_nms_of_no_boxes():
    keep = nms(torch.zeros((0, 4)), torch.zeros((0,)), 0.5)
    expect_close(keep, torch.zeros((0,), dtype=torch.int64), "nms of no boxes: an empty tensor")
    assert keep.dtype == torch.int64, f"nms returns int64 indices, got {keep.dtype}"
