"""RoIAlign: pooling a fixed-size feature from every RoI, on one map or on the level of a feature pyramid.

Mask R-CNN, He et al. 2017 (arXiv:1703.06870) Sec. 3 "RoIAlign", Fig. 3: no quantization of the RoI or its bins;
bilinear values at regular sampling points of each bin, averaged. FPN, Lin et al. 2017 (arXiv:1612.03144) Sec. 4.2,
Eq. 1: the pyramid level an RoI is pooled from. Mask R-CNN Sec. 3: the mask target of an RoI is its GT mask pooled
the same way (mask_targets). Semantics follow torchvision.ops.roi_align / MultiScaleRoIAlign and
roi_heads.project_masks_on_boxes, the references of tests/test_roi_align.py.

These are the plain versions, one RoI (or one level) at a time; the model runs fast_ops.multilevel_roi_align and
fast_ops.mask_targets, which batch the loops and are proven equal to these (tests/test_fast_ops.py).

Shapes: N images, C channels, H, W feature map, R RoIs, S, Q pooled height and width (7 box, 14 mask), gy, gx
sampling points per bin along y and x, G ground-truth masks of size (h, w), P RoIs, M mask side.
"""
import math

import torch

from boxes import box_area


def as_rois(boxes):
    """(R, 5) rois (batch index, x1, y1, x2, y2), or a list of (R_i, 4) boxes per image -> (R, 5) rois."""
    if isinstance(boxes, torch.Tensor):
        assert boxes.dim() == 2 and boxes.shape[1] == 5, f"rois must be (R, 5), got {tuple(boxes.shape)}"
        return boxes
    index = [torch.full_like(b[:, :1], i) for i, b in enumerate(boxes)]  # (R_i, 1) image index of each box
    return torch.cat([torch.cat(index), torch.cat(boxes)], dim=1)  # (R, 5)


def bilinear(feature, y, x):
    """Bilinear interpolation of feature (C, H, W) at points y, x (broadcastable) -> (C, *points), as torchvision's
    RoIAlign kernel reads a point: 0 outside [-1, H] x [-1, W], the border pixel's value in the margin up to it."""
    H, W = feature.shape[-2:]
    inside = (y >= -1) & (y <= H) & (x >= -1) & (x <= W)
    y, x = y.clamp(0, H - 1), x.clamp(0, W - 1)
    y0, x0 = y.floor().long(), x.floor().long()  # the pixel above-left of the point
    y1, x1 = (y0 + 1).clamp(max=H - 1), (x0 + 1).clamp(max=W - 1)  # and below-right of it
    ly, lx = y - y0, x - x0  # the point's distance from (y0, x0), in [0, 1)
    weights = torch.stack([(1 - ly) * (1 - lx), (1 - ly) * lx, ly * (1 - lx), ly * lx])  # (4, *points)
    corners = feature[:, torch.stack([y0, y0, y1, y1]), torch.stack([x0, x1, x0, x1])]  # (C, 4, *points)
    return (corners * weights).sum(1) * inside


def bin_points(start, size, bins, grid):
    """Mask R-CNN Fig. 3 along one axis: `bins` equal bins from `start` over `size` pixels, each with `grid` regular
    sampling points at the centres of `grid` equal slices of it -> (bins, grid) float64 coordinates."""
    i = torch.arange(bins, dtype=torch.float64)[:, None]  # (bins, 1) bin index
    j = torch.arange(grid, dtype=torch.float64)  # (grid,) point index inside a bin
    return start + (i + (j + 0.5) / grid) * (size / bins)


def roi_align(input, boxes, output_size, spatial_scale=1.0, sampling_ratio=-1, aligned=False):
    """RoIAlign (Mask R-CNN Sec. 3, Fig. 3) with the signature and semantics of torchvision.ops.roi_align.

    input (N, C, H, W); boxes (R, 5) as (batch index, x1, y1, x2, y2) or a list of (R_i, 4) per image, in image
    pixels (times spatial_scale gives map pixels). Each RoI is cut into S x Q bins; each bin averages the bilinear
    values at gy x gx regular points (sampling_ratio each, or ceil(RoI side / bins) when <= 0).
    aligned=False is Mask R-CNN's original RoIAlign (RoI sides at least 1 pixel); aligned=True shifts the RoI by
    -0.5 pixel so that pixel centres are at integer + 0.5 (Detectron2's ROIAlignV2). Returns (R, C, S, Q).
    """
    rois = as_rois(boxes)
    S, Q = (output_size, output_size) if isinstance(output_size, int) else tuple(output_size)
    maps, pooled = input.unbind(0), [input.new_zeros((0, input.shape[1], S, Q))]
    dtype = torch.promote_types(input.dtype, torch.float32)  # coordinates and weights: float32 at least
    for n, x1, y1, x2, y2 in rois.tolist():  # one RoI at a time
        x1, y1, x2, y2 = (c * spatial_scale - (0.5 if aligned else 0.0) for c in (x1, y1, x2, y2))  # map pixels
        w, h = (x2 - x1, y2 - y1) if aligned else (max(x2 - x1, 1.0), max(y2 - y1, 1.0))
        gy = sampling_ratio if sampling_ratio > 0 else max(math.ceil(h / S), 0)  # sampling points per bin along y
        gx = sampling_ratio if sampling_ratio > 0 else max(math.ceil(w / Q), 0)  # ... and along x
        ys = bin_points(y1, h, S, gy).to(input.device, dtype)  # (S, gy)
        xs = bin_points(x1, w, Q, gx).to(input.device, dtype)  # (Q, gx)
        values = bilinear(maps[int(n)], ys[:, None, :, None], xs[None, :, None, :])  # (C, S, Q, gy, gx)
        pooled.append((values.sum((-2, -1)) / max(gy * gx, 1)).to(input.dtype)[None])  # each bin's average
    return torch.cat(pooled)  # (R, C, S, Q)


def map_levels(boxes, k_min=2, k_max=5, canonical_size=224, canonical_level=4):
    """FPN Eq. 1: the pyramid level P_k an RoI (R, 4) is pooled from -> (R,) int64 level k in [k_min, k_max]."""
    side = torch.sqrt(box_area(boxes))  # (R,) sqrt(w * h)
    # FPN Eq. (1): k = floor(k0 + log2(sqrt(wh) / 224)), k0 = 4. +1e-6 as torchvision: a side rounded a hair below
    # 224 * 2^j (by under 1e-6 of it, 4e-4 pixels at 448) still gets level k0 + j, e.g. a 210-pixel box resized by
    # float32(800 / 375), whose side is 447.99988: level 5, not 4
    level = torch.floor(canonical_level + torch.log2(side / canonical_size) + 1e-6)
    return level.clamp(min=k_min, max=k_max).to(torch.int64)


def level_scales(features, image_shape):
    """The scale 1 / 2^k of each map P_k (N, C, H/2^k, W/2^k) of a padded batch of size image_shape (H, W), from the
    heights, rounded to a power of two (a map of an odd size is rounded down by the convolutions)."""
    return [2.0 ** round(math.log2(f.shape[-2] / image_shape[0])) for f in features]


def multilevel_roi_align(features, boxes, image_shape, output_size, sampling_ratio=2, aligned=False):
    """RoIAlign each RoI from its FPN level (Eq. 1): features [P2..P5] (N, C, H_k, W_k), boxes [(R_i, 4) per image]
    (or (R, 5) rois) in pixels of the padded batch of size image_shape (H, W) -> (R, C, S, S), as torchvision's
    MultiScaleRoIAlign."""
    N = features[0].shape[0]
    if not isinstance(boxes, torch.Tensor) and len(boxes) != N:
        raise ValueError(f"multilevel_roi_align: boxes for {len(boxes)} images, features for {N}")
    rois = as_rois(boxes)  # (R, 5)
    scales = level_scales(features, image_shape)  # [1/4, 1/8, 1/16, 1/32] for P2..P5
    k_min, k_max = round(-math.log2(scales[0])), round(-math.log2(scales[-1]))
    levels = map_levels(rois[:, 1:], k_min=k_min, k_max=k_max) - k_min  # (R,) index into features
    S = output_size
    pooled = features[0].new_zeros((rois.shape[0], features[0].shape[1], S, S))
    for level, (feature, scale) in enumerate(zip(features, scales)):  # one level at a time
        on_level = torch.where(levels == level)[0]
        pooled[on_level] = roi_align(feature, rois[on_level], S, scale, sampling_ratio, aligned)
    return pooled


def mask_targets(gt_masks, rois, gt_index, M):
    """Mask R-CNN Sec. 3: an RoI's mask target is its matched GT mask cut out by the RoI and resized to M x M, i.e.
    RoIAligned (adaptive sampling, aligned=False) as torchvision's project_masks_on_boxes does.

    gt_masks (G, h, w), rois (P, 4), gt_index (P,) -> (P, M, M) in [0, 1], in the RoIs' dtype (float32 at least):
    float64 in a float64 model, as torchvision's targets (its RoIs' dtype).
    Departure: Detectron rasterizes the GT polygons inside each RoI straight into a binary M x M target; these soft
    targets (edges in (0, 1)) go to the binary cross-entropy as they are, as in torchvision.
    """
    dtype = torch.promote_types(rois.dtype, torch.float32)
    rois = torch.cat([gt_index[:, None].to(rois.dtype), rois], dim=1)  # (P, 5): the "image" is the RoI's GT mask
    return roi_align(gt_masks[:, None].to(dtype), rois, M, sampling_ratio=-1)[:, 0]  # (G, 1, h, w) -> (P, M, M)
