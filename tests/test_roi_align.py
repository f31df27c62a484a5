"""RoIAlign (Mask R-CNN Fig. 3), the FPN level map (FPN Eq. 1), multi-level pooling, mask targets and mask pasting:
the plain versions (roi_align.py, masks.py) and the fast ones (fast_ops.py, each way it pools) against torchvision and
small hand-worked examples."""
import functools
from collections import OrderedDict

import pytest
import torch

import fast_ops
import masks
import roi_align as plain
from boxes import box_area
from roi_align import map_levels

tv = pytest.importorskip("torchvision")

IMPLEMENTATIONS = {  # name -> (roi_align, multilevel_roi_align)
    "plain": (plain.roi_align, plain.multilevel_roi_align),
    "fast-grid": (functools.partial(fast_ops.roi_align, pooling="grid"),
                  functools.partial(fast_ops.multilevel_roi_align, pooling="grid")),
    "fast-sparse": (functools.partial(fast_ops.roi_align, pooling="sparse"),
                    functools.partial(fast_ops.multilevel_roi_align, pooling="sparse")),
}


@pytest.fixture(params=list(IMPLEMENTATIONS))
def impl(request):
    """Runs a test with the plain RoIAlign and with fast_ops' two ways of reading the points: grid_sample (GPUs,
    inference) and a sparse matrix product (training on a CPU)."""
    return IMPLEMENTATIONS[request.param]


def random_boxes(n, size, min_side=0.2, max_side=None, generator=None):
    """n valid (x1 < x2, y1 < y2) boxes of sides in [min_side, max_side] around an image of (h, w) = size."""
    h, w = size
    max_side = max_side or max(h, w)
    xy = torch.rand(n, 2, generator=generator, dtype=torch.float64) * torch.tensor([w, h]) * 1.4 - 0.2 * torch.tensor(
        [w, h])  # top-left corners, some left of / above the image
    wh = min_side + torch.rand(n, 2, generator=generator, dtype=torch.float64) * (max_side - min_side)
    return torch.cat([xy, xy + wh], dim=1)  # (n, 4)


# ---------------------------------------------------------------- roi_align
@pytest.mark.parametrize("aligned", [False, True])
@pytest.mark.parametrize("sampling_ratio", [2, -1, 0])
@pytest.mark.parametrize("spatial_scale", [1.0, 0.25])
def test_roi_align_matches_torchvision_values_and_gradients(aligned, sampling_ratio, spatial_scale, impl):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 13, 17, generator=g, dtype=torch.float64, requires_grad=True)
    image = (13 / spatial_scale, 17 / spatial_scale)
    boxes = random_boxes(40, image, min_side=0.1, generator=g)
    boxes[:4] = torch.tensor([[-40.0, -40, -20, -30],  # fully above-left of the map
                              [200, 10, 260, 90],  # fully right of the map
                              [-8, -8, 6, 5],  # crossing the top-left corner
                              [3.3, 4.1, 3.4, 4.15]]) / spatial_scale  # tiny: below one pixel
    rois = torch.cat([torch.randint(0, 2, (40, 1), generator=g).double(), boxes], dim=1)
    ours = impl[0](x, rois, (5, 4), spatial_scale, sampling_ratio, aligned)
    ref = tv.ops.roi_align(x, rois, (5, 4), spatial_scale, sampling_ratio, aligned)
    torch.testing.assert_close(ours, ref, rtol=0, atol=1e-12)
    assert ref[:2].abs().max() == 0 and ref[2:].abs().max() > 0  # the outside boxes really read zeros
    upstream = torch.randn(ref.shape, generator=g, dtype=torch.float64)
    (grad_ours,) = torch.autograd.grad(ours, x, upstream)
    (grad_ref,) = torch.autograd.grad(ref, x, upstream)
    torch.testing.assert_close(grad_ours, grad_ref, rtol=0, atol=1e-12)


def test_roi_align_float32_list_boxes_and_bfloat16(impl):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 8, 50, 76, generator=g)
    boxes = [random_boxes(n, (200, 304), min_side=2, generator=g).float() for n in (30, 0)]  # one image without RoIs
    ours = impl[0](x, boxes, 7, 0.25, 2)
    ref = tv.ops.roi_align(x, boxes, 7, 0.25, 2)
    assert ours.shape == (30, 8, 7, 7)
    torch.testing.assert_close(ours, ref, rtol=0, atol=1e-4)  # float32: the normalized grid rounds to ~1e-5 pixel
    low = impl[0](x.bfloat16(), boxes, 7, 0.25, 2)
    assert low.dtype == torch.bfloat16
    torch.testing.assert_close(low.float(), ref, rtol=0.02, atol=0.05)
    assert impl[0](x, [torch.zeros(0, 4)] * 2, 7, 0.25, 2).shape == (0, 8, 7, 7)


@pytest.mark.parametrize("aligned, shift", [(False, 0.0), (True, 0.5)])
def test_roi_align_on_a_ramp_reads_the_bin_centres(aligned, shift, impl):
    # f(y, x) = x at pixel (y, x). Bilinear interpolation of a ramp is exact and the points of a bin are symmetric
    # about its centre, so every pooled value is the x of the bin centre (aligned=True: minus half a pixel).
    ramp = torch.arange(10.0).expand(1, 1, 8, 10)
    box = torch.tensor([[0.0, 1.0, 2.0, 7.0, 6.0]])  # x from 1 to 7: three bins of width 2, centres 2, 4, 6
    out = impl[0](ramp, box, (2, 3), sampling_ratio=2, aligned=aligned)
    expected = torch.tensor([2.0, 4.0, 6.0]) - shift
    torch.testing.assert_close(out[0, 0], expected.expand(2, 3))


def test_roi_align_counts_points_outside_the_map_as_zero(impl):
    ones = torch.ones(1, 1, 4, 4)
    # x from -4 to 4 in 2 bins: bin 0 has points at -3 and -1 (x < -1 is dropped, -1 is clamped to 0 and read as 1);
    # bin 1 has points at 1 and 3: both inside. Averages: (0 + 1) / 2 and 1.
    out = impl[0](ones, torch.tensor([[0.0, -4.0, 1.0, 4.0, 3.0]]), (1, 2), sampling_ratio=2)
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
def test_multilevel_roi_align_matches_torchvision(impl, H, W):
    g = torch.Generator().manual_seed(2)
    features = [torch.randn(2, 4, H // s, W // s, generator=g) for s in (4, 8, 16, 32)]  # P2..P5
    boxes = [random_boxes(n, (H, W), min_side=8, max_side=900, generator=g).float() for n in (60, 25)]
    pooler = tv.ops.MultiScaleRoIAlign(["0", "1", "2", "3"], output_size=7, sampling_ratio=2)
    ref = pooler(OrderedDict((str(i), f) for i, f in enumerate(features)), boxes, [(H, W)] * 2)
    ours = impl[1](features, boxes, (H, W), 7, sampling_ratio=2)
    assert len(set(map_levels(torch.cat(boxes)).tolist())) == 4  # every level is used
    torch.testing.assert_close(ours, ref, rtol=0, atol=1e-4)


def test_multilevel_roi_align_needs_boxes_for_each_image(impl):
    features = [torch.zeros(2, 4, 64 // s, 80 // s) for s in (4, 8, 16, 32)]
    boxes = [torch.tensor([[0.0, 0.0, 10.0, 10.0]])] * 3  # image 2 would be read from P3's image 0
    with pytest.raises(ValueError, match="multilevel_roi_align: boxes for 3 images, features for 2"):
        impl[1](features, boxes, (64, 80), 7)


# ---------------------------------------------------------------- mask targets and pasting
@pytest.mark.parametrize("dtype, atol", [(torch.float32, 1e-5), (torch.float64, 1e-12)])  # float rounding of each
@pytest.mark.parametrize("mask_targets", [plain.mask_targets, fast_ops.mask_targets], ids=["plain", "fast"])
def test_mask_targets_match_torchvision_project_masks_on_boxes(mask_targets, dtype, atol):
    # the targets follow the RoIs' dtype, as torchvision's: float64 in a float64 model (averages of up to ~30 x 30
    # bilinear values, summed in another order: float32 ~1e-7 apart, float64 ~1e-16)
    from torchvision.models.detection.roi_heads import project_masks_on_boxes

    g = torch.Generator().manual_seed(3)
    gt_masks = (torch.rand(3, 45, 60, generator=g) > 0.5).to(torch.uint8)
    rois = random_boxes(20, (45, 60), min_side=0.3, max_side=70, generator=g).to(dtype)
    gt_index = torch.randint(0, 3, (20,), generator=g)
    ref = project_masks_on_boxes(gt_masks, rois, gt_index, 28)
    ours = mask_targets(gt_masks, rois, gt_index, 28)
    assert ours.dtype == ref.dtype == dtype
    torch.testing.assert_close(ours, ref, rtol=0, atol=atol)
    empty = mask_targets(gt_masks, rois[:0], gt_index[:0], 28)
    assert empty.shape == (0, 28, 28) and empty.dtype == dtype


@pytest.mark.parametrize("paste_masks", [masks.paste_masks, fast_ops.paste_masks], ids=["plain", "fast"])
def test_paste_masks_matches_torchvision(paste_masks):
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


@pytest.mark.parametrize("paste_masks", [masks.paste_masks, fast_ops.paste_masks], ids=["plain", "fast"])
def test_paste_masks_of_a_constant_mask_fill_the_box(paste_masks):
    # A mask of ones pasted at an integer box: inside the box the padded mask's interpolation is 1 except at the
    # one-pixel border ring where it fades into the zero padding; outside the expanded box everything is 0.
    out = paste_masks(torch.ones(1, 1, 28, 28), torch.tensor([[10.0, 10.0, 38.0, 38.0]]), (50, 50))[0, 0]
    torch.testing.assert_close(out[15:34, 15:34], torch.ones(19, 19), rtol=0, atol=1e-6)  # F.interpolate's 1 - 6e-8
    assert out[:8].eq(0).all() and out[:, 41:].eq(0).all()


