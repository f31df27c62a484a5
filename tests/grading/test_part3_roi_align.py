"""Part 3 (assignment.py): RoIAlign (Mask R-CNN Sec. 3, Fig. 3), the pyramid level of an RoI (FPN Eq. 1) and the
mask targets (Mask R-CNN Sec. 3).

The functions: roi_align.bilinear, roi_align.bin_points, roi_align.roi_align, roi_align.map_levels,
roi_align.multilevel_roi_align, roi_align.mask_targets.
"""
from collections import OrderedDict

import torch
import torchvision
from torchvision.models.detection.roi_heads import project_masks_on_boxes

from grading import expect_close
from roi_align import bilinear, bin_points, map_levels, mask_targets, multilevel_roi_align, roi_align


def random_rois(n, image, seed, images=2):
    """(n, 5) RoIs (image index, x1, y1, x2, y2) inside an image of size (h, w), some smaller than a pixel."""
    g = torch.Generator().manual_seed(seed)
    h, w = image
    xy = torch.rand(n, 2, generator=g) * torch.tensor([w, h]) * 0.8
    wh = torch.rand(n, 2, generator=g) * torch.tensor([w, h]) * 0.5 + 0.2
    index = torch.randint(0, images, (n, 1), generator=g).float()
    return torch.cat([index, xy, xy + wh], dim=1)


def test_bilinear_hand_worked():
    feature = torch.tensor([[[0.0, 1.0], [2.0, 3.0]]])  # (C, H, W) = (1, 2, 2): pixel (y, x) has value 2y + x
    y = torch.tensor([0.5, 0.0, 1.0, -0.5, -2.0, 1.5])
    x = torch.tensor([0.5, 1.0, 0.25, 1.0, 0.0, 1.0])
    # inside the map bilinear interpolation of 2y + x is 2y + x itself; in the margin [-1, 0) or (H - 1, H] a point
    # reads the border pixel; beyond the margin (y = -2) it reads 0
    expect_close(bilinear(feature, y, x), [[1.5, 1.0, 2.25, 1.0, 0.0, 3.0]], "bilinear at six points, (C, 6)")


def test_bin_points_hand_worked():
    # 2 bins over [0, 4), 2 points per bin at the centres of its halves
    expect_close(bin_points(0.0, 4.0, 2, 2), [[0.5, 1.5], [2.5, 3.5]], "bin_points(start=0, size=4, bins=2, grid=2)")
    expect_close(bin_points(1.0, 3.0, 3, 1), [[1.5], [2.5], [3.5]], "bin_points(start=1, size=3, bins=3, grid=1)")


def test_roi_align_on_a_ramp():
    # a map whose value is its x coordinate: bilinear sampling is exact, so each bin reads the mean x of its points,
    # the bin's centre: bins of width 2 from x = 2 have centres 3, 5, 7, 9 (aligned=True shifts them by -0.5)
    ramp = torch.arange(16.0).expand(1, 1, 8, 16).contiguous()
    rois = torch.tensor([[0.0, 2.0, 0.0, 10.0, 4.0]])
    expect_close(roi_align(ramp, rois, (1, 4), sampling_ratio=2), [[[[3.0, 5.0, 7.0, 9.0]]]],
                 "roi_align of the x ramp, RoI x from 2 to 10 in 4 bins")
    expect_close(roi_align(ramp, rois, (1, 4), sampling_ratio=2, aligned=True), [[[[2.5, 4.5, 6.5, 8.5]]]],
                 "the same with aligned=True")


def test_roi_align_matches_torchvision_values_and_gradients():
    for aligned, sampling_ratio in [(False, 2), (False, -1), (True, 2), (True, 0)]:
        feature = torch.randn(2, 3, 10, 12, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
        ours_in, theirs_in = feature.clone().requires_grad_(), feature.clone().requires_grad_()
        rois = random_rois(9, (20, 24), seed=1).double()
        ours = roi_align(ours_in, rois, (3, 4), spatial_scale=0.5, sampling_ratio=sampling_ratio, aligned=aligned)
        theirs = torchvision.ops.roi_align(theirs_in, rois, (3, 4), spatial_scale=0.5, sampling_ratio=sampling_ratio,
                                           aligned=aligned)
        what = f"roi_align(aligned={aligned}, sampling_ratio={sampling_ratio}) as torchvision.ops.roi_align"
        expect_close(ours, theirs, what)
        weights = torch.randn(theirs.shape, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
        (ours * weights).sum().backward()
        (theirs * weights).sum().backward()
        expect_close(ours_in.grad, theirs_in.grad, "the gradient of " + what)


def test_roi_align_and_mask_targets_dtypes():
    feature = torch.randn(1, 2, 8, 8, generator=torch.Generator().manual_seed(8)).bfloat16()
    pooled = roi_align(feature, torch.tensor([[0.0, 1.0, 1.0, 6.0, 5.0]]), 2, sampling_ratio=2)
    assert pooled.dtype == torch.bfloat16, f"roi_align of a bf16 map: expected bf16 output, got {pooled.dtype}"
    masks = torch.zeros(1, 8, 8, dtype=torch.uint8)
    targets = mask_targets(masks, torch.tensor([[0.0, 0.0, 4.0, 4.0]], dtype=torch.float64), torch.tensor([0]), 2)
    assert targets.dtype == torch.float64, f"mask_targets of float64 RoIs: expected float64, got {targets.dtype}"


def test_roi_align_takes_a_list_of_boxes_per_image():
    feature = torch.randn(2, 2, 8, 8, generator=torch.Generator().manual_seed(3))
    boxes = [torch.tensor([[1.0, 1.0, 6.0, 5.0]]), torch.tensor([[0.0, 2.0, 7.0, 7.0], [2.0, 2.0, 3.0, 3.0]])]
    expect_close(roi_align(feature, boxes, 2, sampling_ratio=2), torchvision.ops.roi_align(feature, boxes, 2, 1.0, 2),
                 "roi_align of a list of (R_i, 4) boxes per image, as torchvision")


def test_map_levels_hand_worked():
    sides = torch.tensor([224.0, 112.0, 448.0, 1000.0, 16.0, 223.0, 56.0])
    boxes = torch.stack([torch.zeros(7), torch.zeros(7), sides, sides], dim=1)  # squares: sqrt(wh) = side
    # k = floor(4 + log2(side / 224)) within [2, 5]: 224 -> 4, 112 -> 3, 448 -> 5, 1000 -> 6 -> 5, 16 -> 0 -> 2,
    # 223 -> 3 (just under 224), 56 -> 2
    expect_close(map_levels(boxes), [4, 3, 5, 5, 2, 3, 2], "map_levels of squares of sides " + str(sides.tolist()))
    # a float32 square whose side rounds to 223.99997: level 4 thanks to Eq. 1's + 1e-6, as torchvision
    box = torch.tensor([[317.0393371582031, 317.0393371582031, 541.039306640625, 541.039306640625]])
    expect_close(map_levels(box), [4], "map_levels of a float32 square of side 224 - 3e-5 (+ 1e-6 in the floor)")


def test_multilevel_roi_align_matches_torchvision():
    image_shape = (128, 192)
    g = torch.Generator().manual_seed(4)
    features = [torch.randn(2, 3, 128 // s, 192 // s, generator=g) for s in (4, 8, 16, 32)]  # P2..P5
    boxes = [random_rois(n, image_shape, seed=5 + n, images=1)[:, 1:] for n in (6, 9)]  # levels 2 and 3
    # sqrt(wh) of 300, 490, 10: levels 4, 5 and 2 (FPN Eq. 1), the first two reaching beyond the image
    boxes[1] = torch.cat([boxes[1], torch.tensor([[0.0, 0.0, 360.0, 250.0], [-150.0, -100.0, 340.0, 390.0],
                                                  [3.0, 3.0, 13.0, 13.0]])])
    ours = multilevel_roi_align(features, boxes, image_shape, 7, sampling_ratio=2)
    pool = torchvision.ops.MultiScaleRoIAlign(["p2", "p3", "p4", "p5"], 7, sampling_ratio=2)
    theirs = pool(OrderedDict(zip(["p2", "p3", "p4", "p5"], features)), boxes, [image_shape] * 2)
    expect_close(ours, theirs, "multilevel_roi_align of RoIs of two images over P2..P5, as MultiScaleRoIAlign")


def test_mask_targets_hand_worked():
    gt_masks = torch.zeros(2, 8, 8)
    gt_masks[0, :, :4] = 1  # GT 0: the left half; GT 1: empty
    rois = torch.tensor([[0.0, 0.0, 4.0, 8.0], [0.0, 0.0, 8.0, 8.0], [0.0, 0.0, 8.0, 8.0]])
    targets = mask_targets(gt_masks, rois, torch.tensor([0, 0, 1]), 4)
    # RoI 0 (the left half, 4 bins of width 1, one point each at x = 0.5 .. 3.5): the point at 3.5 reads half of
    # pixel 3 (1) and half of pixel 4 (0). RoI 1 (the whole mask, bins of width 2, points at 0.5, 1.5 | 2.5, 3.5 | ...):
    # 1, 0.75, 0, 0. RoI 2 is matched to the empty GT 1.
    rows = [torch.tensor([1.0, 1.0, 1.0, 0.5]), torch.tensor([1.0, 0.75, 0.0, 0.0]), torch.zeros(4)]
    expected = torch.stack([row.expand(4, 4) for row in rows])  # every row of a target alike: the mask is columns
    expect_close(targets, expected, "mask_targets of three RoIs, M = 4")


def test_mask_targets_match_torchvision():
    g = torch.Generator().manual_seed(6)
    gt_masks = (torch.rand(3, 30, 40, generator=g) > 0.5).float()
    rois = random_rois(10, (30, 40), seed=7)[:, 1:]
    gt_index = torch.randint(0, 3, (10,), generator=g)
    expect_close(mask_targets(gt_masks, rois, gt_index, 14), project_masks_on_boxes(gt_masks, rois, gt_index, 14),
                 "mask_targets, as torchvision's project_masks_on_boxes")
