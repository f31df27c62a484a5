"""RoIAlign: pooling a fixed-size feature from every RoI, on one map or on the level of a feature pyramid.

Mask R-CNN, He et al. 2017 (arXiv:1703.06870) Sec. 3 "RoIAlign", Fig. 3: no quantization of the RoI or its bins;
bilinear values at regular sampling points of each bin, averaged. FPN, Lin et al. 2017 (arXiv:1612.03144) Sec. 4.2,
Eq. 1: the pyramid level an RoI is pooled from. Mask R-CNN Sec. 3: the mask target of an RoI is its GT mask pooled
the same way (mask_targets). Semantics follow torchvision.ops.roi_align / MultiScaleRoIAlign and
roi_heads.project_masks_on_boxes, the references of tests/test_roi_heads.py.

Shapes: N images, C channels, H, W feature map, L levels, R RoIs, S, Q pooled height and width (7 box, 14 mask),
GY, GX sampling points per bin along y and x, A = 2 GY, B = 2 GX their neighbouring pixel rows and columns, G
ground-truth masks of size (h, w), P RoIs, M mask side.
"""
import math
import warnings

import torch
import torch.nn.functional as F

from boxes import box_area

__all__ = ["as_rois", "sample_points", "axis_weights", "roi_align", "pool_levels", "sparse_pooling",
           "pool_grid", "pool_sparse", "map_levels", "multilevel_roi_align", "mask_targets"]

OUTSIDE = -3.0  # a normalized grid_sample coordinate off the map: the sample reads the zero padding, i.e. adds 0
# Devices that pool maps needing a gradient with a sparse matrix of bilinear weights (pool_sparse) instead of
# grid_sample (pool_grid); both give torchvision's values. On a CPU, grid_sample's backward is the costliest op of a
# training step after the convolutions: roi_align forward and backward (2 threads, a 2x256x100x152 map, 512 RoIs of
# sides 2 to 77 map pixels, 7x7, sampling_ratio 2) took 0.98 s with grid_sample, 0.17 s as a sparse product with 4
# entries per sampling point. Inference keeps grid_sample: its forward alone is slower (0.23 s against 0.10 s, same
# shapes), but whole-model inference came out even (tiny at 128x160: 0.18 s against 0.20 s with the sparse product;
# r50_fpn_gn at 800x1216: 6.6 s against 6.5 s). On a GPU, grid_sample is what was measured.
SPARSE_DEVICES = ("cpu",)
# PyTorch notes once per process that its CSR layout is in beta; pool_sparse relies only on its product and gradient,
# which tests/test_roi_heads.py checks against torchvision. (Muting it inside pool_sparse with catch_warnings would
# reset Python's once-per-location record of other warnings at every call.)
warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta state")


def sparse_pooling(maps):
    """Whether pool_levels reads the points of these maps (N, C, H_l, W_l) with pool_sparse (see SPARSE_DEVICES)."""
    return maps[0].device.type in SPARSE_DEVICES and torch.is_grad_enabled() and maps[0].requires_grad


def as_rois(boxes):
    """(R, 5) rois (batch index, x1, y1, x2, y2), or a list of (R_i, 4) boxes per image -> (R, 5) rois."""
    if isinstance(boxes, torch.Tensor):
        assert boxes.dim() == 2 and boxes.shape[1] == 5, f"rois must be (R, 5), got {tuple(boxes.shape)}"
        return boxes
    index = [torch.full_like(b[:, :1], i) for i, b in enumerate(boxes)]  # (R_i, 1) image index of each box
    return torch.cat([torch.cat(index), torch.cat(boxes)], dim=1)  # (R, 5)


def sample_points(start, size, bins, grid, max_grid, length):
    """RoIAlign's regular sampling points along one axis (Mask R-CNN Fig. 3), as torchvision's kernel places them.

    start, size, grid (R, 1, 1): RoI start and extent in feature-map pixels and points per cell; bins: pooled
    cells; length: the map's extent, a number or (R, 1, 1) per RoI (RoIs pooled from different FPN levels).
    Returns points (R, bins, max_grid) clamped into [0, length - 1], and keep (R, bins, max_grid): False for the
    padding points beyond an RoI's own grid and for points outside [-1, length], which torchvision counts as 0.
    """
    bin_size = size / bins  # (R, 1, 1)
    cell = torch.arange(bins, device=start.device, dtype=start.dtype).view(bins, 1)  # (bins, 1)
    half = torch.arange(0.5, max_grid, device=start.device, dtype=start.dtype)  # (max_grid,) i + 1/2
    # bin start + (i + 1/2) * bin_size / grid: `grid` points spread evenly inside each cell, none on its border
    pts = torch.addcmul(start, cell, bin_size) + half * bin_size / grid.clamp(min=1)  # (R, bins, max_grid)
    keep = (half < grid) & (pts >= -1.0) & (pts <= length)  # i < grid for whole numbers i, grid
    return pts.clamp(min=0).clamp_(max=length - 1), keep


def axis_weights(pts, keep, grid, length):
    """Bilinear interpolation along one axis, averaged over a cell's points: points (R, bins, G) from sample_points
    -> pixel indices (R, bins, 2G) int64 (each point's lower and upper neighbour) and weights (R, bins, 2G), each
    point's (1 - frac, frac) times its share keep / grid of the cell's average. A point on the last pixel (frac 0)
    gets that pixel twice, as torchvision's kernel does. length: a number or (R, 1, 1)."""
    low = pts.floor()
    frac = pts - low
    weight = keep / grid.clamp(min=1)  # each point's share of the cell's average; 0 for dropped points
    index = torch.cat([low, (low + 1).clamp(max=length - 1)], dim=-1).to(torch.int64)
    return index, torch.cat([(1 - frac) * weight, frac * weight], dim=-1)


def roi_align(input, boxes, output_size, spatial_scale=1.0, sampling_ratio=-1, aligned=False):
    """RoIAlign (Mask R-CNN Sec. 3, Fig. 3) with the signature and semantics of torchvision.ops.roi_align.

    input (N, C, H, W); boxes (R, 5) as (batch index, x1, y1, x2, y2) or a list of (R_i, 4) per image, in image
    pixels (times spatial_scale gives map pixels). Each RoI is cut into S x Q cells; each cell averages the bilinear
    values at GY x GX regular points (sampling_ratio each, or ceil(RoI side / cells) per RoI when <= 0).
    aligned=False is Mask R-CNN's original RoIAlign (no half-pixel shift, RoI sides at least 1 pixel);
    aligned=True shifts by -0.5 so that pixel centres are at integer + 0.5 (Detectron2's ROIAlignV2).
    With sampling_ratio <= 0 every RoI is sampled on the largest RoI's grid (its own points kept, the rest masked), so
    time and memory grow with the largest RoI; the detector uses sampling_ratio=2.
    Returns (R, C, S, Q).
    """
    rois = as_rois(boxes)
    return pool_levels([input], rois, torch.zeros_like(rois[:, 0], dtype=torch.int64), [spatial_scale], output_size,
                       sampling_ratio, aligned)


def pool_levels(features, rois, levels, scales, output_size, sampling_ratio, aligned):
    """RoIAlign of each RoI (R, 5) from the map features[levels[r]] (N, C, H_l, W_l) at scale scales[levels[r]].

    The RoIs' batch indices must lie in [0, N): an index N or more would be read from another level's map (pair
    level * N + image), and only indices beyond the last level are caught.
    No loop over RoIs: the RoIs are sorted by the (level, image) pair they are pooled from, the sampling points of
    all of them are computed at once, and each pair's RoIs are pooled in one call (pool_sparse for CPU maps that
    need gradients, pool_grid otherwise: see SPARSE_DEVICES). One host sync, the RoI count of every pair, and with
    sampling_ratio <= 0 a second, the largest sampling grid. The small per-level table is copied from the host right
    after the first, when the GPU has no work queued for that copy to wait for.
    """
    S, Q = (output_size, output_size) if isinstance(output_size, int) else tuple(output_size)
    N, C = features[0].shape[:2]
    L, R = len(features), rois.shape[0]
    if R == 0:
        return features[0].new_zeros((0, C, S, Q))
    # grid_sample's grid has the input's dtype; fp16/bf16 coordinates would be off by up to a pixel, so sample in fp32.
    maps = [f if f.dtype in (torch.float32, torch.float64) else f.float() for f in features]
    pair = levels * N + rois[:, 0].long()  # (R,) the (level, image) each RoI is pooled from
    order = torch.sort(pair, stable=True).indices  # (R,) RoIs grouped by pair
    counts = torch.bincount(pair, minlength=L * N).tolist()  # host sync: RoIs per (level, image)
    assert len(counts) == L * N, f"roi batch indices must lie in [0, {N})"
    table = maps[0].new_tensor([(s, f.shape[-2], f.shape[-1]) for s, f in zip(scales, features)])  # (L, 3)
    scale, H, W = table[levels[order], :, None, None].unbind(dim=1)  # (R, 1, 1) each, in the order of `order`
    offset = 0.5 if aligned else 0.0
    x1, y1, x2, y2 = (rois[order, 1:, None, None].to(maps[0].dtype) * scale[:, None] - offset).unbind(dim=1)
    roi_w, roi_h = x2 - x1, y2 - y1  # (R, 1, 1) each, in map pixels
    if not aligned:
        roi_w, roi_h = roi_w.clamp(min=1.0), roi_h.clamp(min=1.0)  # Mask R-CNN: no RoI thinner than one pixel
    if sampling_ratio > 0:
        grid_y = grid_x = torch.full_like(roi_h, sampling_ratio)
        GY = GX = sampling_ratio
    else:
        # adaptive: ceil(side / cells) points per cell, per RoI; all RoIs use the largest grid, masked per RoI
        grid_y, grid_x = torch.ceil(roi_h / S).clamp(min=0), torch.ceil(roi_w / Q).clamp(min=0)
        GY, GX = torch.stack([grid_y.max(), grid_x.max()]).clamp(min=1).int().tolist()  # host sync
    ys, keep_y = sample_points(y1, roi_h, S, grid_y, GY, H)  # (R, S, GY)
    xs, keep_x = sample_points(x1, roi_w, Q, grid_x, GX, W)  # (R, Q, GX)
    if sparse_pooling(maps):
        out = pool_sparse(maps, counts, axis_weights(ys, keep_y, grid_y, H), axis_weights(xs, keep_x, grid_x, W))
    else:
        out = pool_grid(maps, counts, (ys, keep_y, H), (xs, keep_x, W))
        if sampling_ratio <= 0:  # adaptive: torchvision divides an RoI's sum by its own count grid_y * grid_x (>= 1)
            out = out * ((GY * GX) / (grid_y * grid_x).clamp(min=1))[:, None]
    return out.new_empty(out.shape).index_copy(0, order, out).to(features[0].dtype)  # back in the order of rois


def pool_grid(maps, counts, y_points, x_points):
    """The points of each (level, image) pair's RoIs read by grid_sample and averaged per cell -> (R, C, S, Q), RoIs
    in pair order. y_points: points (R, S, GY), keep (R, S, GY) and map height (R, 1, 1); x_points likewise.

    A point x in map pixels is at the normalized coordinate (2x + 1) / W - 1 for align_corners=False, and bilinear
    weights then equal torchvision's. grid_sample pairs grid and input batch entries one to one, hence one call per
    pair. The mean is over all GY * GX points; dropped points read the zero padding, i.e. count 0.
    """
    (ys, keep_y, H), (xs, keep_x, W) = y_points, x_points
    N, C = maps[0].shape[:2]
    (R, S, GY), (Q, GX) = ys.shape, xs.shape[1:]
    # A dropped point goes off the map on one axis, so grid_sample's zero padding makes it count 0 (any other axis).
    gy = torch.where(keep_y, (2 * ys + 1) / H - 1, OUTSIDE)  # (R, S, GY)
    gx = torch.where(keep_x, (2 * xs + 1) / W - 1, OUTSIDE)  # (R, Q, GX)
    grid = torch.stack([gx.view(R, 1, Q, 1, GX).expand(R, S, Q, GY, GX),
                        gy.view(R, S, 1, GY, 1).expand(R, S, Q, GY, GX)], dim=-1)  # (R, S, Q, GY, GX, 2) as (x, y)
    grid = grid.view(R * S * Q, GY * GX, 2)  # a cell's points side by side, to average
    pooled, start = [], 0
    for p, count in enumerate(counts):  # loop over (level, image) pairs, not RoIs
        if count:
            level, n = divmod(p, N)
            samples = F.grid_sample(maps[level][n, None], grid[None, start:start + count * S * Q],
                                    mode="bilinear", padding_mode="zeros", align_corners=False)
            pooled.append(samples.mean(dim=-1))  # (1, C, count*S*Q, GY*GX) -> (1, C, count*S*Q)
            start += count * S * Q
    return torch.cat(pooled, dim=2).view(C, R, S, Q).permute(1, 0, 2, 3)  # (R, C, S, Q)


def pool_sparse(maps, counts, y_weights, x_weights):
    """RoIAlign as a sparse matrix product -> (R, C, S, Q), RoIs in pair order. y_weights: axis_weights' pixel rows
    (R, S, A) and weights (R, S, A); x_weights: columns (R, Q, B) and weights (R, Q, B).

    A pooled value is a weighted sum of map pixels (Mask R-CNN Fig. 3 is linear in the map): cell (i, j) of RoI r
    reads pixel (iy[r, i, a], ix[r, j, b]) with weight wy[r, i, a] * wx[r, j, b], already divided by the RoI's own
    point count. So the cells of a (level, image) pair's RoIs are one sparse (cells, H * W) matrix times the map seen
    as (H * W, C); a pixel read twice adds up when the matrix is coalesced. Its gradient is the transposed product.
    """
    (iy, wy), (ix, wx) = y_weights, x_weights
    N, C = maps[0].shape[:2]
    (R, S, A), (Q, B) = iy.shape, ix.shape[1:]
    weights = (wy.view(R, S, 1, A, 1) * wx.view(R, 1, Q, 1, B)).view(R, S * Q * A * B)  # (R, cells * A * B)
    pooled, start = [], 0
    with torch.autocast(maps[0].device.type, enabled=False):  # the product stays in the maps' float32
        for p, count in enumerate(counts):  # loop over (level, image) pairs, not RoIs
            if count:
                level, n = divmod(p, N)
                H, W = maps[level].shape[-2:]
                rows = iy[start:start + count].view(count, S, 1, A, 1)
                cols = ix[start:start + count].view(count, 1, Q, 1, B)
                pixels = rows * W + cols  # (count, S, Q, A, B) flat pixel index
                cells = torch.arange(count * S * Q, device=iy.device).repeat_interleave(A * B)  # (count*S*Q*A*B,)
                matrix = torch.sparse_coo_tensor(torch.stack([cells, pixels.flatten()]),
                                                 weights[start:start + count].flatten(), (count * S * Q, H * W),
                                                 check_invariants=False).coalesce().to_sparse_csr()
                pooled.append(matrix @ maps[level][n].reshape(C, H * W).t())  # (count*S*Q, C)
                start += count
    return torch.cat(pooled).view(R, S, Q, C).permute(0, 3, 1, 2)  # (R, C, S, Q)


def map_levels(boxes, k_min=2, k_max=5, canonical_size=224, canonical_level=4):
    """FPN Eq. 1: the pyramid level P_k an RoI (R, 4) is pooled from -> (R,) int64 level k in [k_min, k_max]."""
    side = torch.sqrt(box_area(boxes))  # (R,) sqrt(w * h)
    # FPN Eq. (1): k = floor(k0 + log2(sqrt(wh) / 224)), k0 = 4. +1e-6 as torchvision: a side rounded a hair below
    # 224 * 2^j (by under 1e-6 of it, 4e-4 pixels at 448) still gets level k0 + j, e.g. a 210-pixel box resized by
    # float32(800 / 375), whose side is 447.99988: level 5, not 4
    level = torch.floor(canonical_level + torch.log2(side / canonical_size) + 1e-6)
    return level.clamp(min=k_min, max=k_max).to(torch.int64)


def multilevel_roi_align(features, boxes, image_shape, output_size, sampling_ratio=2, aligned=False):
    """RoIAlign each RoI from its FPN level (Eq. 1): features [P2..P5] (N, C, H_k, W_k), boxes [(R_i, 4) per image]
    in pixels of the padded batch of size image_shape (H, W) -> (sum R_i, C, S, S), as torchvision MultiScaleRoIAlign.
    boxes may also be (R, 5) rois, whose batch indices must then lie in [0, N) (see pool_levels).
    """
    N = features[0].shape[0]
    if not isinstance(boxes, torch.Tensor) and len(boxes) != N:
        raise ValueError(f"multilevel_roi_align: boxes for {len(boxes)} images, features for {N}")
    rois = as_rois(boxes)  # (R, 5)
    # level scale = 1 / stride, recovered from the sizes and rounded to a power of two (H / 4 -> 1/4 for P2, ...)
    scales = [2.0 ** round(math.log2(f.shape[-2] / image_shape[0])) for f in features]
    k_min, k_max = round(-math.log2(scales[0])), round(-math.log2(scales[-1]))
    levels = map_levels(rois[:, 1:], k_min=k_min, k_max=k_max) - k_min  # (R,) index into features
    return pool_levels(features, rois, levels, scales, output_size, sampling_ratio, aligned)


def mask_targets(gt_masks, rois, gt_index, M):
    """Mask R-CNN Sec. 3: an RoI's mask target is its matched GT mask cut out by the RoI and resized to M x M.

    gt_masks (G, h, w), rois (P, 4), gt_index (P,) -> (P, M, M) float in [0, 1]; equal to torchvision's
    project_masks_on_boxes, i.e. roi_align(gt_masks, rois, M, aligned=False, sampling_ratio=-1).
    Departure: Detectron rasterizes the GT polygons inside each RoI straight into a binary M x M target; these soft
    targets (edges in (0, 1)) go to the binary cross-entropy as they are, as in torchvision.
    RoIAlign is separable: its points form a grid ys x xs and a bilinear weight is wy * wx, so a cell's average is
    (Ay @ mask @ Bx^T)[cell] with Ay (M, h), Bx (M, w) each axis's interpolation weights averaged over the cell's
    points. For one-channel masks this is two matrix products instead of up to ~30 x 30 points per cell for big
    objects. Ay is sparse and picks each RoI's own GT mask: it is one (P*M, G*h) sparse matrix.
    """
    P, (G, h, w) = rois.shape[0], gt_masks.shape
    if P == 0:
        return rois.new_zeros((0, M, M))
    x1, y1, x2, y2 = rois[:, :, None, None].unbind(dim=1)  # (P, 1, 1) each
    roi_w, roi_h = (x2 - x1).clamp(min=1.0), (y2 - y1).clamp(min=1.0)  # aligned=False: at least one pixel
    grid_y, grid_x = torch.ceil(roi_h / M), torch.ceil(roi_w / M)  # (P, 1, 1) adaptive sampling, at least 1
    GY, GX = torch.stack([grid_y.max(), grid_x.max()]).int().tolist()  # host sync: the largest grids
    ys, keep_y = sample_points(y1, roi_h, M, grid_y, GY, h)  # (P, M, GY)
    xs, keep_x = sample_points(x1, roi_w, M, grid_x, GX, w)  # (P, M, GX)
    iy, wy = axis_weights(ys, keep_y, grid_y, h)  # (P, M, 2GY)
    ix, wx = axis_weights(xs, keep_x, grid_x, w)  # (P, M, 2GX)
    Bx = wx.new_zeros((P, M, w)).scatter_add_(2, ix, wx)  # (P, M, w)
    row = torch.arange(P * M, device=rois.device).repeat_interleave(iy.shape[-1])  # (P*M*2GY,) (RoI, cell) row
    col = (gt_index.to(torch.int64)[:, None, None] * h + iy).reshape(-1)  # (P*M*2GY,) row of the stacked GT masks
    Ay = torch.sparse_coo_tensor(torch.stack([row, col]), wy.reshape(-1).float(), (P * M, G * h),
                                 check_invariants=False)  # (P*M, G*h); rows and columns in range by construction
    with torch.autocast(rois.device.type, enabled=False):  # targets need no gradient; sparse mm has no bf16 kernel
        rows_pooled = torch.sparse.mm(Ay, gt_masks.reshape(G * h, w).float())  # (P*M, w); duplicates add
        return rows_pooled.reshape(P, M, w) @ Bx.float().transpose(1, 2)  # (P, M, w) @ (P, w, M) -> (P, M, M)
