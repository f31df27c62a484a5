"""The fast equivalents of the paper's plain ops: the same results, in fewer passes, kernel launches or host syncs.

The reading path writes each op as its paper states it (the "plain" column); this module holds what speed needed
instead. Every function here names the plain function it must equal, and tests/test_fast_ops.py proves each pair
equal on random and edge-case inputs (the plain ones are in turn compared with torchvision in their own tests).
The model uses these by default; `build_model(..., plain_ops=True)` (train.py / evaluate.py / bench.py
`--plain-ops`) runs the plain versions everywhere.

    fast (this file)                       plain (the paper's version)
    group_norm                             norm.group_norm                  GN Eqs. 1, 2, 6, 7
    nms, batched_nms                       boxes.nms, boxes.batched_nms     Faster R-CNN Sec. 3.3
    select_proposals                       rpn.RPN.select_proposals         Faster R-CNN Sec. 3.3, FPN Sec. 4.1
    roi_align, multilevel_roi_align        roi_align.roi_align, ...         Mask R-CNN Fig. 3, FPN Eq. 1
    mask_targets                           roi_align.mask_targets           Mask R-CNN Sec. 3
    paste_masks                            masks.paste_masks                Mask R-CNN Sec. 3.1

Why they are faster, in short: the plain versions loop in Python (over kept boxes, RoIs, levels, detections) and
let autograd record every small op; on a GPU at 2 images per step the time goes into issuing those small ops, and
on a CPU into the extra passes over memory. The fast versions batch the loops into a few large tensor ops, write
GroupNorm's backward out, and pick per device the pooling primitive that is quickest there. Measured figures are
in the README ("Measured here") and come from bench.py.

Shapes: as in the plain versions' files (N images, C channels, G groups, R RoIs, S x Q pooled cells, ...).
"""
import math

import torch
import torch.nn.functional as F

from boxes import big_enough, box_area, clip_boxes
from roi_align import as_rois, level_scales, map_levels

# ============================================================================================ GroupNorm


def _group_statistics(x, num_groups, eps, one_pass):
    """x (N, C, *) -> x viewed as (N, G, C/G, S) with S the product of the spatial sizes, the groups' mean mu and
    r = 1 / sqrt(sigma^2 + eps) of GN Eq. 2, both (N, G, 1, 1) and float32 at least: reductions with dtype= or an
    out= of float32 read bf16/fp16 values directly (such calls are also exempt from autocast).

    one_pass takes sigma^2 from torch.var, in one more read of x: on a GPU both ways are bound by memory, and the
    two-pass way's (x - mu) tensor costs two more passes. On a CPU torch.var's kernel (Welford's update, a division
    per value) is much slower than subtracting, squaring and averaging, so the CPU default is the two-pass way.
    """
    N, C, G = x.shape[0], x.shape[1], num_groups
    xg = x.reshape(N, G, C // G, math.prod(x.shape[2:]))  # (N, G, C/G, S); sizes spelled out for N = 0
    stat = torch.float64 if x.dtype == torch.float64 else torch.float32
    mean = torch.mean(xg, (2, 3), keepdim=True, dtype=stat)  # (N, G, 1, 1) mu
    if N == 0:
        var = mean.clone()
    elif one_pass:
        var = torch.var(xg, (2, 3), correction=0, keepdim=True, out=torch.empty_like(mean))
    else:
        var = torch.mean((xg - mean).square_(), (2, 3), keepdim=True)  # GN Eq. 2, (x - mu) in float32 at least
    return xg, mean, var.add_(eps).rsqrt_()  # sigma^2 biased, as GN Eq. 2


def _group_norm_no_grad(x, weight, bias, num_groups, eps, one_pass):
    """GN without gradients (inference): after the statistics, y = x * scale + shift in one pass over x, with
    per-channel scale = gamma * r and shift = beta - mu * gamma * r computed in float32 and applied in the kernel."""
    xg, mean, rstd = _group_statistics(x, num_groups, eps, one_pass)  # (N, G, C/G, S), (N, G, 1, 1), (N, G, 1, 1)
    N, G, Cg = xg.shape[:3]
    gamma = weight.view(G, Cg, 1) if weight is not None else rstd.new_ones(G, Cg, 1)  # (G, C/G, 1)
    beta = bias.view(G, Cg, 1) if bias is not None else rstd.new_zeros(G, Cg, 1)
    scale = rstd * gamma  # (N, G, C/G, 1): channel c of group g gets gamma_c * r_g
    shift = torch.addcmul(beta, mean, scale, value=-1)  # (N, G, C/G, 1) beta - mu * gamma * r
    per_channel = (N, G * Cg) + (1,) * (x.dim() - 2)  # (N, C, 1, ..., 1), broadcasts against x in its own layout
    return torch.addcmul(shift.view(per_channel), x, scale.view(per_channel), out=torch.empty_like(x))


class _GroupNormFunction(torch.autograd.Function):
    """GN with a written-out backward pass, in few passes over the activation and few small ops.

    Per image n and group g (S_i of GN Eq. 7: its L = C/G * H * W values), with r = 1 / sqrt(sigma^2 + eps) (Eq. 2):
        forward   x_hat = (x - mu) * r,   y = gamma * x_hat + beta
        backward  dbeta_c = sum dy,   dgamma_c = sum dy * x_hat                    (sums over n and the pixels)
                  dx = r * (gamma * dy - 1/L sum_S gamma * dy - x_hat/L * sum_S gamma * dy * x_hat)
    The backward is the usual normalization derivative: removing the mean and the scale of a group takes out of
    dx its components along 1 and along x_hat. Both group sums are gamma-weighted sums of the per-channel sums
    db = sum_pixels dy and ds = sum_pixels dy * x_hat, so the backward reads dy three times (the two sums and dx),
    x_hat twice, and writes and reads one dy * x_hat temporary. Autograd through norm.group_norm instead records
    about fifteen ops and keeps their float32 copies of the activation.
    x_hat (not x) is kept for backward: sum dy * x_hat has no cancellation even when |mu| >> sigma, which
    matters when x_hat is stored in bf16. Statistics and per-channel sums are float32 for bf16/fp16 inputs, reduced
    from the input's dtype directly (dtype= or out= of float32); x_hat, y and dx are written in the input's dtype
    (out= with a bf16 destination casts inside the kernel). Autocast needs no switching off: it leaves in-place ops
    and calls with out= or dtype= alone, and the rest (mul, stack) are not on its lists.
    Everything works on the grouped view (N, G, C/G, S), where per-group (N, G, 1, 1) and per-channel (G, C/G, 1)
    tensors broadcast without reshapes.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, num_groups, eps, one_pass):
        xg, mean, rstd = _group_statistics(x, num_groups, eps, one_pass)  # (N, G, C/G, S), (N, G, 1, 1) twice
        G, Cg = xg.shape[1:3]
        x_hat = torch.addcmul(mean.mul_(rstd).neg_(), xg, rstd, out=torch.empty_like(xg))  # GN Eq. 1: (x - mu) r
        y = x_hat.view(x.shape)
        if weight is not None:  # GN Eq. 6: y = gamma * x_hat + beta, per channel, in x's own memory layout
            per_channel = (G * Cg,) + (1,) * (x.dim() - 2)  # (C, 1, ..., 1)
            y = torch.addcmul(bias.view(per_channel), y, weight.view(per_channel), out=torch.empty_like(x))
        ctx.save_for_backward(x_hat, rstd, weight)
        return y

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dy):
        x_hat, rstd, weight = ctx.saved_tensors  # (N, G, C/G, S), (N, G, 1, 1), (C,) or None
        N, G, Cg, S = x_hat.shape
        dyg = dy.reshape(x_hat.shape)  # (N, G, C/G, S)
        # (2, N, G, C/G, 1): per channel, db = sum over pixels of dy and ds = sum over pixels of dy * x_hat
        sums = torch.stack((dyg.sum(3, keepdim=True, dtype=rstd.dtype),
                            (dyg * x_hat).sum(3, keepdim=True, dtype=rstd.dtype)))
        scale = rstd * (weight.view(G, Cg, 1) if weight is not None else rstd.new_ones(G, Cg, 1))  # (N, G, C/G, 1)
        # (2, N, G, 1, 1): -r/L sum_S gamma * dy and -r/L sum_S gamma * dy * x_hat
        minus_db, minus_ds = (sums * scale).sum(3, keepdim=True).mul_(-1.0 / (Cg * S)).unbind()
        # dx = (r * gamma) * dy + (-r/L sum_S gamma dy) + (-r/L sum_S gamma dy x_hat) * x_hat: two passes, the
        # first in float32 (its two terms may cancel against the third)
        dx = torch.addcmul(torch.addcmul(minus_db, x_hat, minus_ds), dyg, scale, out=torch.empty_like(dyg))
        if weight is None:
            return dx.view(dy.shape), None, None, None, None, None
        dbeta, dgamma = sums.sum(1).view(2, G * Cg).to(weight.dtype).unbind()  # (C,) each: sums over the images
        return dx.view(dy.shape), dgamma, dbeta, None, None, None


def group_norm(x, num_groups, weight=None, bias=None, eps=1e-5, one_pass=None):
    """Equals norm.group_norm (GN Eqs. 1, 2, 6, 7). With gradients: a written-out backward (_GroupNormFunction);
    without (inference): one pass over x after the statistics. one_pass: the variance in one read of x (default:
    on a GPU; see _group_statistics)."""
    one_pass = x.is_cuda if one_pass is None else one_pass
    if torch.is_grad_enabled() and (x.requires_grad or weight is not None and weight.requires_grad):
        return _GroupNormFunction.apply(x, weight, bias, num_groups, eps, one_pass)
    return _group_norm_no_grad(x, weight, bias, num_groups, eps, one_pass)


# ============================================================================================ NMS

# Box pairs per block of an NMS suppression matrix. On a GPU, big blocks (a few float tensors of 64 MB): few kernel
# launches and host syncs. On a CPU, where those cost little, blocks of 1 MB floats that stay in the cache.
NMS_BLOCK_GPU = 1 << 24
NMS_BLOCK_CPU = 1 << 18


def _suppression_pairs(boxes, valid, groups, iou_threshold, lengths, block):
    """Rows of boxes, each sorted by decreasing score -> the nonzero entries of their "suppresses" matrices.

    boxes (B, K, 4), valid (B, K) bool (False: padding, never suppresses nor is kept), groups (B, K) int64 or None.
    lengths: None, or B numbers such that entries at or beyond lengths[b] are padding; rows of a run of equal lengths
    are then paired only up to that length (the RPN's short levels are not padded up to K x K pairs).
    S[b, i, j] = i ranks above j in row b (i < j), both valid, same group when groups are given, and
    IoU(i, j) > iou_threshold. IoU uses the arithmetic of boxes.box_iou (so ties at the threshold fall the same way).
    Returns (E,) source and (E,) destination indices into the flattened B*K entries.
    Memory: S is computed in blocks of at most `block` pairs, upper part only, and only its E entries above the
    threshold are kept: usually a tiny fraction of the B*K*K pairs, never B x K x K floats. One host sync per block.
    """
    B, K = valid.shape
    area = box_area(boxes)  # (B, K)
    x1, y1, x2, y2 = boxes.unbind(dim=2)  # (B, K) each
    lengths = [K] * B if lengths is None else list(lengths)
    src = [torch.zeros(0, dtype=torch.int64, device=boxes.device)]
    dst = [torch.zeros(0, dtype=torch.int64, device=boxes.device)]
    run_start = 0
    for b_end in range(1, B + 1):  # runs of rows run_start..b_end of the same length n
        if b_end < B and lengths[b_end] == lengths[run_start]:
            continue
        n = lengths[run_start]
        rows = max(1, min(n, block // max(n, 1)))  # rows i of one block ...
        batch = max(1, block // max(rows * n, 1))  # ... and how many rows b at once
        for b in range(run_start, b_end, batch):  # blocks (b..c, s..e) against columns s..n: no box suppresses one
            c = min(b_end, b + batch)  # above it
            for s in range(0, n, rows):
                e = min(n, s + rows)
                w = (torch.min(x2[b:c, s:e, None], x2[b:c, None, s:n])
                     - torch.max(x1[b:c, s:e, None], x1[b:c, None, s:n])).clamp_(min=0)  # (c-b, e-s, n-s)
                h = (torch.min(y2[b:c, s:e, None], y2[b:c, None, s:n])
                     - torch.max(y1[b:c, s:e, None], y1[b:c, None, s:n])).clamp_(min=0)  # (c-b, e-s, n-s)
                inter = w * h
                union = area[b:c, s:e, None] + area[b:c, None, s:n] - inter
                pairs = (inter / union > iou_threshold).triu_(diagonal=1)  # strictly upper: j > i
                pairs &= valid[b:c, s:e, None] & valid[b:c, None, s:n]
                if groups is not None:
                    pairs &= groups[b:c, s:e, None] == groups[b:c, None, s:n]
                row_b, i, j = torch.where(pairs)
                src.append((row_b + b) * K + i + s)
                dst.append((row_b + b) * K + j + s)
        run_start = b_end
    return torch.cat(src), torch.cat(dst)


def _greedy_fixed_point(src, dst, valid):
    """Greedy NMS from the suppression pairs (E,), (E,) of entries in score order; valid (M,) -> keep (M,) bool.

    Greedy NMS keeps box j iff no KEPT box above j suppresses it: keep = valid & ~(S & keep[:, None]).any(0), a fixed
    point. We iterate that equation from keep = valid (here in sparse form: count, for every box, its kept
    suppressors). Why this gives exactly greedy NMS: S is strictly upper triangular, so keep[j] depends only on
    keep[:j]. Box 0 has no suppressor and is correct after one step; if keep[:t] is correct after step t, keep[t] is
    correct after step t + 1 and keep[:t] no longer changes. Entries become correct in score order, so the fixed point
    is unique (it is the greedy answer) and is reached within M steps; in practice within about the length of the
    longest chain of boxes suppressing one another (a few steps), each step costing O(E). Independent rows (images,
    levels, classes) have no pair between them, so they all iterate together. Testing for the fixed point is a host
    sync, so it is tested every second step: at most one step more, half the syncs.
    """
    def step(keep):
        kept_suppressors = torch.zeros(valid.shape, dtype=torch.int32, device=valid.device).index_add_(
            0, dst, keep[src].to(torch.int32))  # (M,) for every box, how many kept boxes above it suppress it
        return valid & (kept_suppressors == 0)

    keep = step(valid)
    while True:
        new_keep = step(keep)
        if torch.equal(new_keep, keep):  # the host sync: keep is the fixed point
            return keep
        keep = step(new_keep)


def _block(device, block):
    return block or (NMS_BLOCK_CPU if device.type == "cpu" else NMS_BLOCK_GPU)


def padded_nms(boxes, scores, valid, iou_threshold, lengths=None, block=None):
    """Greedy NMS in each row of a padded batch: boxes (B, K, 4), scores (B, K), valid (B, K) bool -> keep (B, K).

    Each row's kept entries are boxes.nms of its valid entries. Rows are independent (the RPN's (image, level)
    pairs); invalid entries are padding, dropped and inert; equal scores rank in input order. Work: B*K*K pairs, in
    blocks of `block` (default: NMS_BLOCK_CPU or NMS_BLOCK_GPU); with lengths (B numbers, all entries of row b from
    lengths[b] on invalid, rows of equal length next to each other), the sum over rows of lengths[b]^2. Sorting keeps
    that bound: valid entries (finite scores) sort before padding.
    """
    B, K = scores.shape
    order = torch.sort(scores.masked_fill(~valid, -math.inf), dim=1, descending=True, stable=True).indices  # (B, K)
    sorted_boxes = boxes.gather(1, order[..., None].expand(B, K, 4))  # (B, K, 4), each row by decreasing score
    sorted_valid = valid.gather(1, order)  # (B, K): padding last (or among the -inf scores, where it is inert)
    src, dst = _suppression_pairs(sorted_boxes, sorted_valid, None, iou_threshold, lengths,
                                  _block(boxes.device, block))
    keep_sorted = _greedy_fixed_point(src, dst, sorted_valid.reshape(-1)).view(B, K)  # (B*K,) -> (B, K)
    return torch.zeros_like(valid).scatter_(1, order, keep_sorted)  # (B, K) back in input order


def _one_row_nms(boxes, scores, idxs, iou_threshold, block):
    """(N, 4) boxes as one row of pairs; with idxs (N,), only boxes of the same group suppress each other.
    -> kept indices, by decreasing score, ties in input order."""
    order = torch.sort(scores, descending=True, stable=True).indices  # (N,)
    valid = torch.ones((1, order.shape[0]), dtype=torch.bool, device=boxes.device)  # (1, N): one row, no padding
    groups = None if idxs is None else idxs[order][None]  # (1, N)
    src, dst = _suppression_pairs(boxes[order][None], valid, groups, iou_threshold, None,
                                  _block(boxes.device, block))  # box src suppresses dst
    return order[_greedy_fixed_point(src, dst, valid[0])]


def nms(boxes, scores, iou_threshold, block=None):
    """Equals boxes.nms (Faster R-CNN Sec. 3.3), without a Python loop over the kept boxes: the pairs that suppress
    one another, in blocks of `block` pairs (_suppression_pairs), then greedy NMS as a fixed point over them
    (_greedy_fixed_point): a few large ops and a few host syncs instead of one small op and one sync per kept box."""
    return _one_row_nms(boxes, scores, None, iou_threshold, block)


def batched_nms(boxes, scores, idxs, iou_threshold, block=None):
    """Equals boxes.batched_nms: NMS within each group of idxs (N,), all groups at once, with no loop over them.

    Boxes are sorted by score (stable) and S[i, j] also needs idxs[i] == idxs[j], so the pairs are those of one N x N
    matrix (in blocks) and the fixed point runs once for all groups. Exact, unlike torchvision's trick of offsetting
    each group's coordinates (which rounds them). The work is N^2 pairs instead of the sum of the squared group
    sizes: fine for detections (a few thousand boxes, one block of pairs, no host sync before the fixed point).
    Above one block, when padding every group to the largest one (G x K x K pairs) is cheaper, the groups go through
    padded_nms instead (two host syncs to find G and K).
    """
    n = scores.shape[0]
    if n * n > _block(boxes.device, block):  # over one block of pairs: padding each group to the largest may cost less
        group_ids, group, counts = torch.unique(idxs, return_inverse=True, return_counts=True)  # (G,), (N,), (G,)
        G, K = group_ids.shape[0], int(counts.max())  # host syncs
        if G * K * K < n * n:
            by_group = torch.sort(group, stable=True).indices  # (N,) grouped, input order inside a group
            slot = torch.arange(K, device=idxs.device)  # (K,)
            valid = slot < counts[:, None]  # (G, K) False: padding
            index = by_group[((torch.cumsum(counts, 0) - counts)[:, None] + slot).clamp(max=n - 1)]  # (G, K)
            kept = torch.sort(index[padded_nms(boxes[index], scores[index], valid, iou_threshold,
                                               block=block)]).values
            return kept[torch.sort(scores[kept], descending=True, stable=True).indices]
    return _one_row_nms(boxes, scores, idxs, iou_threshold, block)


def image_limits(image_sizes, like):
    """[(h, w)] per image -> (N, 4) upper bounds (w, h, w, h) for boxes.clip_boxes, with like's dtype and device.
    Written entry by entry (fills): a tensor made from a Python list is a host-to-device copy, which waits for a GPU."""
    limits = like.new_empty((len(image_sizes), 4))
    for limit, (h, w) in zip(limits, image_sizes):
        limit[0::2], limit[1::2] = w, h
    return limits


def select_proposals(proposals, objectness, image_sizes, num_anchors_per_level, pre_nms_top_n, post_nms_top_n,
                     nms_thresh, min_size, score_thresh):
    """Equals rpn.RPN.select_proposals (its loop over images and levels): proposals (N, T, 4), objectness logits
    (N, T) -> N x (R, 4), by decreasing score.

    All images and levels at once: the top-k candidates of each (level, image) form one row of a padded (L*N, k)
    batch (levels with fewer than k anchors are padded, and paired only up to their length), and padded_nms runs on
    all rows together. The only host sync besides the NMS is the number of proposals each image keeps.
    """
    k = min(pre_nms_top_n, max(num_anchors_per_level))  # row length of the padded batch
    slot = torch.arange(k, device=objectness.device)  # (k,) position in a row
    top_idx, valid, lengths, offset = [], [], [], 0
    n, L = objectness.shape[0], len(num_anchors_per_level)
    for num in num_anchors_per_level:  # top-k on logits within each level, as torchvision
        k_level = min(pre_nms_top_n, num)
        idx = objectness[:, offset:offset + num].topk(k_level, dim=1).indices + offset  # (N, k_level)
        top_idx.append(F.pad(idx, (0, k - k_level)))  # (N, k): padded with anchor 0, marked invalid below
        valid.append(slot < k_level)  # (k,)
        lengths += [k_level] * n
        offset += num
    top_idx = torch.stack(top_idx, dim=1)  # (N, L, k)
    batch_idx = torch.arange(n, device=proposals.device)[:, None, None]  # (N, 1, 1)
    scores = torch.sigmoid(objectness[batch_idx, top_idx])  # (N, L, k)
    limits = image_limits(image_sizes, proposals)[:, None, None]  # (N, 1, 1, 4)
    boxes = clip_boxes(proposals[batch_idx, top_idx], limits)  # (N, L, k, 4)
    valid = torch.stack(valid) & big_enough(boxes, min_size) & (scores >= score_thresh)  # (N, L, k)
    # NMS within each level; rows level-major, so that rows of equal length are neighbours
    keep = padded_nms(boxes.transpose(0, 1).reshape(L * n, k, 4), scores.transpose(0, 1).reshape(L * n, k),
                      valid.transpose(0, 1).reshape(L * n, k), nms_thresh, lengths)  # (L*N, k)
    keep = keep.view(L, n, k).transpose(0, 1).reshape(n, L * k)  # (N, L*k)
    # per image: the kept boxes by decreasing score, ties in level-then-top-k order (a stable sort, as batched_nms)
    order = torch.sort(scores.view(n, L * k).masked_fill(~keep, -1.0), dim=1, descending=True,
                       stable=True).indices  # (N, L*k): kept first (scores are >= 0)
    counts = keep.sum(dim=1).clamp(max=post_nms_top_n).tolist()  # host sync: R per image
    boxes = boxes.view(n, L * k, 4).gather(1, order[:, :max(counts, default=0), None].expand(-1, -1, 4))
    return [b[:r] for b, r in zip(boxes, counts)]  # N x (R, 4), by decreasing score


# ============================================================================================ RoIAlign

OUTSIDE = -3.0  # a normalized grid_sample coordinate off the map: the sample reads the zero padding, i.e. adds 0


def _sample_points(start, size, bins, grid, max_grid, length):
    """RoIAlign's regular sampling points along one axis for all RoIs at once, as torchvision's kernel places them.

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


def _axis_weights(pts, keep, grid, length):
    """Bilinear interpolation along one axis, averaged over a cell's points: points (R, bins, G) from _sample_points
    -> pixel indices (R, bins, 2G) int64 (each point's lower and upper neighbour) and weights (R, bins, 2G), each
    point's (1 - frac, frac) times its share keep / grid of the cell's average. A point on the last pixel (frac 0)
    gets that pixel twice, as torchvision's kernel does. length: a number or (R, 1, 1)."""
    low = pts.floor()
    frac = pts - low
    weight = keep / grid.clamp(min=1)  # each point's share of the cell's average; 0 for dropped points
    index = torch.cat([low, (low + 1).clamp(max=length - 1)], dim=-1).to(torch.int64)
    return index, torch.cat([(1 - frac) * weight, frac * weight], dim=-1)


def _pool_grid(maps, counts, y_points, x_points):
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


def _pool_sparse(maps, counts, y_weights, x_weights):
    """RoIAlign as a sparse matrix product -> (R, C, S, Q), RoIs in pair order. y_weights: _axis_weights' pixel rows
    (R, S, A) and weights (R, S, A); x_weights: columns (R, Q, B) and weights (R, Q, B).

    A pooled value is a weighted sum of map pixels (Mask R-CNN Fig. 3 is linear in the map): cell (i, j) of RoI r
    reads pixel (iy[r, i, a], ix[r, j, b]) with weight wy[r, i, a] * wx[r, j, b], already divided by the RoI's own
    point count. So the cells of a (level, image) pair's RoIs are one sparse (cells, H * W) matrix times the map seen
    as (H * W, C); a pixel read twice adds up. Its gradient is the transposed product: on a CPU much cheaper than
    grid_sample's backward, which scatters every point's four weights one by one.
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
                                                 check_invariants=False)  # indices in range by construction
                pooled.append(torch.sparse.mm(matrix, maps[level][n].reshape(C, H * W).t()))  # (count*S*Q, C)
                start += count
    return torch.cat(pooled).view(R, S, Q, C).permute(0, 3, 1, 2)  # (R, C, S, Q)


def _pool_levels(features, rois, levels, scales, output_size, sampling_ratio, aligned, pooling):
    """RoIAlign of each RoI (R, 5) from the map features[levels[r]] (N, C, H_l, W_l) at scale scales[levels[r]].

    No loop over RoIs: the RoIs are sorted by the (level, image) pair they are pooled from, the sampling points of
    all of them are computed at once, and each pair's RoIs are pooled in one call. pooling: "sparse" (_pool_sparse)
    or "grid" (_pool_grid, grid_sample); None picks "sparse" for CPU maps that need gradients (grid_sample's
    backward is slow there) and "grid" otherwise (inference, GPUs). One host sync, the RoI count of every pair, and
    with sampling_ratio <= 0 a second, the largest sampling grid.
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
    ys, keep_y = _sample_points(y1, roi_h, S, grid_y, GY, H)  # (R, S, GY)
    xs, keep_x = _sample_points(x1, roi_w, Q, grid_x, GX, W)  # (R, Q, GX)
    if pooling is None:
        pooling = "sparse" if maps[0].device.type == "cpu" and torch.is_grad_enabled() and maps[0].requires_grad \
            else "grid"
    if pooling == "sparse":
        out = _pool_sparse(maps, counts, _axis_weights(ys, keep_y, grid_y, H), _axis_weights(xs, keep_x, grid_x, W))
    else:
        out = _pool_grid(maps, counts, (ys, keep_y, H), (xs, keep_x, W))
        if sampling_ratio <= 0:  # adaptive: torchvision divides an RoI's sum by its own count grid_y * grid_x (>= 1)
            out = out * ((GY * GX) / (grid_y * grid_x).clamp(min=1))[:, None]
    return out.new_empty(out.shape).index_copy(0, order, out).to(features[0].dtype)  # back in the order of rois


def roi_align(input, boxes, output_size, spatial_scale=1.0, sampling_ratio=-1, aligned=False, pooling=None):
    """Equals roi_align.roi_align (Mask R-CNN Fig. 3; torchvision.ops.roi_align's signature and semantics), without
    its loop over RoIs (see _pool_levels). pooling: "grid", "sparse" or None (by device and need of gradients).
    With sampling_ratio <= 0 every RoI is sampled on the largest RoI's grid (its own points kept, the rest masked), so
    time and memory grow with the largest RoI; the detector uses sampling_ratio=2."""
    rois = as_rois(boxes)
    return _pool_levels([input], rois, torch.zeros_like(rois[:, 0], dtype=torch.int64), [spatial_scale],
                        output_size, sampling_ratio, aligned, pooling)


def multilevel_roi_align(features, boxes, image_shape, output_size, sampling_ratio=2, aligned=False, pooling=None):
    """Equals roi_align.multilevel_roi_align (FPN Eq. 1 levels, then RoIAlign), without its loop over levels: all
    levels' RoIs in one _pool_levels call. The RoIs' batch indices must lie in [0, N): an index N or more would be
    read from another level's map (pair level * N + image), and only indices beyond the last level are caught."""
    N = features[0].shape[0]
    if not isinstance(boxes, torch.Tensor) and len(boxes) != N:
        raise ValueError(f"multilevel_roi_align: boxes for {len(boxes)} images, features for {N}")
    rois = as_rois(boxes)  # (R, 5)
    scales = level_scales(features, image_shape)
    k_min, k_max = round(-math.log2(scales[0])), round(-math.log2(scales[-1]))
    levels = map_levels(rois[:, 1:], k_min=k_min, k_max=k_max) - k_min  # (R,) index into features
    return _pool_levels(features, rois, levels, scales, output_size, sampling_ratio, aligned, pooling)


def mask_targets(gt_masks, rois, gt_index, M):
    """Equals roi_align.mask_targets (each RoI's GT mask RoIAligned to M x M, torchvision's project_masks_on_boxes)
    -> (P, M, M) in the RoIs' dtype (float32 at least), with a few matrix products instead of up to ~30 x 30 bilinear
    points per cell.

    RoIAlign is separable: its points form a grid ys x xs and a bilinear weight is wy * wx, so a cell's average is
    (Ay @ mask @ Bx^T)[cell] with Ay (M, h), Bx (M, w) each axis's interpolation weights averaged over the cell's
    points. Ay is sparse and picks each RoI's own GT mask: it is one (P*M, G*h) sparse matrix.
    """
    P, (G, h, w) = rois.shape[0], gt_masks.shape
    dtype = torch.promote_types(rois.dtype, torch.float32)  # float64 in a float64 model, as the plain version
    if P == 0:
        return rois.new_zeros((0, M, M), dtype=dtype)
    x1, y1, x2, y2 = rois[:, :, None, None].unbind(dim=1)  # (P, 1, 1) each
    roi_w, roi_h = (x2 - x1).clamp(min=1.0), (y2 - y1).clamp(min=1.0)  # aligned=False: at least one pixel
    grid_y, grid_x = torch.ceil(roi_h / M), torch.ceil(roi_w / M)  # (P, 1, 1) adaptive sampling, at least 1
    GY, GX = torch.stack([grid_y.max(), grid_x.max()]).int().tolist()  # host sync: the largest grids
    ys, keep_y = _sample_points(y1, roi_h, M, grid_y, GY, h)  # (P, M, GY)
    xs, keep_x = _sample_points(x1, roi_w, M, grid_x, GX, w)  # (P, M, GX)
    iy, wy = _axis_weights(ys, keep_y, grid_y, h)  # (P, M, 2GY)
    ix, wx = _axis_weights(xs, keep_x, grid_x, w)  # (P, M, 2GX)
    Bx = wx.new_zeros((P, M, w)).scatter_add_(2, ix, wx)  # (P, M, w)
    row = torch.arange(P * M, device=rois.device).repeat_interleave(iy.shape[-1])  # (P*M*2GY,) (RoI, cell) row
    col = (gt_index.to(torch.int64)[:, None, None] * h + iy).reshape(-1)  # (P*M*2GY,) row of the stacked GT masks
    Ay = torch.sparse_coo_tensor(torch.stack([row, col]), wy.reshape(-1).to(dtype), (P * M, G * h),
                                 check_invariants=False)  # (P*M, G*h); rows and columns in range by construction
    with torch.autocast(rois.device.type, enabled=False):  # targets need no gradient; sparse mm has no bf16 kernel
        rows_pooled = torch.sparse.mm(Ay, gt_masks.reshape(G * h, w).to(dtype))  # (P*M, w); duplicates add
        return rows_pooled.reshape(P, M, w) @ Bx.to(dtype).transpose(1, 2)  # (P, M, w) @ (P, w, M) -> (P, M, M)


# ============================================================================================ mask pasting


def _paste_weights(start, end, T, length):
    """Per box, the (length, T) matrix that resizes T mask pixels onto the integer pixels start..end of an axis.

    start, end (D,) int64. Equals F.interpolate(mode="bilinear", align_corners=False) of the T pixels to
    n = max(end - start + 1, 1) pixels, placed at start; rows outside [start, end] (and the image) are zero.
    """
    pixel = torch.arange(length, device=start.device)  # (length,) image pixel index
    n = (end - start + 1).clamp(min=1)  # (D,) the box covers end inclusive
    local = (pixel[None, :] - start[:, None]).to(torch.float32)  # (D, length) index j inside the resized mask
    # align_corners=False: output pixel j samples the input at (j + 0.5) * T / n - 0.5, clamped at 0 (PyTorch)
    src = ((local + 0.5) * (T / n.to(torch.float32))[:, None] - 0.5).clamp(min=0)  # (D, length)
    low = src.floor().to(torch.int64).clamp(max=T - 1)  # (D, length)
    high = (low + 1).clamp(max=T - 1)
    frac = src - low
    inside = ((pixel[None, :] >= start[:, None]) & (pixel[None, :] <= end[:, None])).to(torch.float32)
    index = torch.stack([low, high], dim=-1)  # (D, length, 2)
    weight = torch.stack([1 - frac, frac], dim=-1) * inside[..., None]  # (D, length, 2)
    return torch.zeros(start.shape[0], length, T, device=start.device).scatter_add_(2, index, weight)  # (D, length, T)


def paste_masks(mask_probs, boxes, image_size, padding=1):
    """Equals masks.paste_masks ((D, 1, M, M) masks into an (h, w) image at their (D, 4) boxes -> (D, 1, h, w)),
    without its loop over boxes: bilinear resizing is separable, so each pasted mask is Wy @ mask @ Wx^T with per-box
    interpolation matrices that are zero outside the (padded, truncated) box: three batched matrix products."""
    D, _, M, _ = mask_probs.shape
    h, w = image_size
    if D == 0:
        return mask_probs.new_zeros((0, 1, h, w))
    masks = F.pad(mask_probs[:, 0], (padding,) * 4).to(torch.float32)  # (D, T, T), T = M + 2 * padding
    T = M + 2 * padding
    scale = T / M
    half_w = (boxes[:, 2] - boxes[:, 0]) * 0.5 * scale  # the box grows like the padded mask
    half_h = (boxes[:, 3] - boxes[:, 1]) * 0.5 * scale
    center_x = (boxes[:, 2] + boxes[:, 0]) * 0.5
    center_y = (boxes[:, 3] + boxes[:, 1]) * 0.5
    x0, x1 = (center_x - half_w).to(torch.int64), (center_x + half_w).to(torch.int64)  # truncation, as torchvision
    y0, y1 = (center_y - half_h).to(torch.int64), (center_y + half_h).to(torch.int64)
    rows = _paste_weights(y0, y1, T, h)  # (D, h, T)
    cols = _paste_weights(x0, x1, T, w)  # (D, w, T)
    pasted = rows @ masks @ cols.transpose(1, 2)  # (D, h, T) @ (D, T, T) @ (D, T, w) -> (D, h, w)
    return pasted[:, None].to(mask_probs.dtype)  # (D, 1, h, w)
