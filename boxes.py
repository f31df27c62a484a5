"""Box operations shared by the RPN and the RoI heads.

Faster R-CNN, Ren et al. 2015 (arXiv:1506.01497): Sec. 3.1.2 (box parameterization Eq. 2, anchor labels from IoU),
Sec. 3.1.3 (balanced sampling of 256 anchors), Sec. 3.3 (NMS). Fast R-CNN, Girshick 2015 (arXiv:1504.08083),
Sec. 2.3 (the same sampling idea for RoIs). Semantics follow torchvision (`ops/boxes.py`, `models/detection/_utils.py`),
which our tests use as the reference.

Boxes are (x1, y1, x2, y2) floats in pixels; width = x2 - x1 (no Detectron-1 "+1").
Shapes: N, M boxes; G ground-truth boxes; P predictions (anchors or proposals); R boxes to encode/decode;
K classes (boxes per row of a class-specific decode).
"""
import math

import torch

POSITIVE, NEGATIVE, IGNORE = 1, 0, -1  # sampler labels (Faster R-CNN Sec. 3.1.2)
# Box pairs per block of an NMS suppression matrix. On a GPU, big blocks (a few float tensors of 64 MB): few kernel
# launches and host syncs. On a CPU, where those cost little, blocks of 1 MB floats that stay in the cache.
NMS_BLOCK = 1 << 24
NMS_BLOCK_CPU = 1 << 18


def nms_block(device):
    """Box pairs per block of the suppression matrix on this device."""
    return NMS_BLOCK_CPU if device.type == "cpu" else NMS_BLOCK


def box_area(boxes):
    """(..., 4) -> (...,) areas."""
    return (boxes[..., 2] - boxes[..., 0]) * (boxes[..., 3] - boxes[..., 1])


def box_iou(boxes1, boxes2):
    """Intersection over union of every pair: (N, 4), (M, 4) -> (N, M)."""
    area1 = box_area(boxes1)  # (N,)
    area2 = box_area(boxes2)  # (M,)
    top_left = torch.max(boxes1[:, None, :2], boxes2[None, :, :2])  # (N, M, 2)
    bottom_right = torch.min(boxes1[:, None, 2:], boxes2[None, :, 2:])  # (N, M, 2)
    wh = (bottom_right - top_left).clamp(min=0)  # (N, M, 2)
    inter = wh[..., 0] * wh[..., 1]  # (N, M)
    union = area1[:, None] + area2[None, :] - inter  # (N, M)
    return inter / union


class BoxCoder:
    """Faster R-CNN Eq. (2): boxes <-> deltas (t_x, t_y, t_w, t_h) relative to reference boxes (anchors or RoIs).

    `weights` scale the four deltas (Fast R-CNN's target normalisation, (10, 10, 5, 5) in the box head; RPN uses 1s).
    `clip` caps t_w, t_h before exp() so a wild prediction cannot overflow: at most 1000/16 times the reference size.
    """

    def __init__(self, weights=(1.0, 1.0, 1.0, 1.0), clip=math.log(1000 / 16)):
        self.weights = weights
        self.clip = clip

    def encode(self, gt_boxes, ref_boxes):
        """gt_boxes (R, 4), ref_boxes (R, 4) -> deltas (R, 4)."""
        wx, wy, ww, wh = self.weights
        ref_w = ref_boxes[:, 2] - ref_boxes[:, 0]
        ref_h = ref_boxes[:, 3] - ref_boxes[:, 1]
        ref_x = ref_boxes[:, 0] + 0.5 * ref_w
        ref_y = ref_boxes[:, 1] + 0.5 * ref_h
        gt_w = gt_boxes[:, 2] - gt_boxes[:, 0]
        gt_h = gt_boxes[:, 3] - gt_boxes[:, 1]
        gt_x = gt_boxes[:, 0] + 0.5 * gt_w
        gt_y = gt_boxes[:, 1] + 0.5 * gt_h
        dx = wx * (gt_x - ref_x) / ref_w  # Eq. (2): t_x = (x - x_a) / w_a
        dy = wy * (gt_y - ref_y) / ref_h  # Eq. (2): t_y = (y - y_a) / h_a
        dw = ww * torch.log(gt_w / ref_w)  # Eq. (2): t_w = log(w / w_a)
        dh = wh * torch.log(gt_h / ref_h)  # Eq. (2): t_h = log(h / h_a)
        return torch.stack((dx, dy, dw, dh), dim=1)  # (R, 4)

    def decode(self, deltas, ref_boxes):
        """deltas (R, 4) or (R, K, 4), ref_boxes (R, 4) -> boxes with the shape of deltas, float32 at least (as
        Detectron2: bf16 deltas from autocast would give coordinates beyond 1024 pixels on a grid of 8)."""
        wx, wy, ww, wh = self.weights
        shape = deltas.shape
        dtype = torch.promote_types(torch.promote_types(deltas.dtype, ref_boxes.dtype), torch.float32)
        deltas = deltas.reshape(shape[0], shape[1] if deltas.dim() == 3 else 1, 4)  # (R, K, 4); K = 1: agnostic
        deltas, ref_boxes = deltas.to(dtype), ref_boxes.to(dtype)
        ref_w = (ref_boxes[:, 2] - ref_boxes[:, 0])[:, None]  # (R, 1)
        ref_h = (ref_boxes[:, 3] - ref_boxes[:, 1])[:, None]
        ref_x = ref_boxes[:, 0, None] + 0.5 * ref_w
        ref_y = ref_boxes[:, 1, None] + 0.5 * ref_h
        dx = deltas[..., 0] / wx  # (R, K)
        dy = deltas[..., 1] / wy
        dw = (deltas[..., 2] / ww).clamp(max=self.clip)
        dh = (deltas[..., 3] / wh).clamp(max=self.clip)
        x = dx * ref_w + ref_x  # Eq. (2) inverted: x = t_x * w_a + x_a
        y = dy * ref_h + ref_y
        w = torch.exp(dw) * ref_w  # Eq. (2) inverted: w = exp(t_w) * w_a
        h = torch.exp(dh) * ref_h
        half_w = 0.5 * w
        half_h = 0.5 * h
        boxes = torch.stack((x - half_w, y - half_h, x + half_w, y + half_h), dim=2)  # (R, K, 4)
        return boxes.reshape(shape)


def image_limits(image_sizes, like):
    """[(h, w)] per image -> (N, 4) upper bounds (w, h, w, h) with like's dtype and device, for clip_boxes.
    Written entry by entry (fills): a tensor made from a Python list is a host-to-device copy, which waits for a GPU."""
    limits = like.new_empty((len(image_sizes), 4))
    for limit, (h, w) in zip(limits, image_sizes):
        limit[0::2], limit[1::2] = w, h
    return limits


def clip_boxes(boxes, size):
    """Clamp (..., 4) boxes into their image. size: (h, w), or limits (w, h, w, h) broadcasting against boxes, as
    image_limits gives them (a batch of boxes from several images clipped at once)."""
    limits = size if isinstance(size, torch.Tensor) else image_limits([size], boxes)[0]  # (..., 4) or (4,)
    return torch.min(boxes.clamp(min=0), limits)


def big_enough(boxes, min_size):
    """(..., 4) boxes -> (...,) bool: width and height both >= min_size."""
    return (boxes[..., 2] - boxes[..., 0] >= min_size) & (boxes[..., 3] - boxes[..., 1] >= min_size)


def remove_small_boxes(boxes, min_size):
    """Indices of the (N, 4) boxes whose width and height are both >= min_size."""
    return torch.where(big_enough(boxes, min_size))[0]


def _suppression_pairs(boxes, valid, groups, iou_threshold, lengths=None):
    """Rows of boxes, each sorted by decreasing score -> the nonzero entries of their "suppresses" matrices.

    boxes (B, K, 4), valid (B, K) bool (False: padding, never suppresses nor is kept), groups (B, K) int64 or None.
    lengths: None, or B numbers such that entries at or beyond lengths[b] are padding; rows of a run of equal lengths
    are then paired only up to that length (the RPN's short levels are not padded up to K x K pairs).
    S[b, i, j] = i ranks above j in row b (i < j), both valid, same group when groups are given, and
    IoU(i, j) > iou_threshold. IoU uses the arithmetic of box_iou (so ties at the threshold fall as in torchvision).
    Returns (E,) source and (E,) destination indices into the flattened B*K entries.
    Memory: S is computed in blocks of at most nms_block() pairs (GPU: 16M, a few float blocks of 64 MB), upper part
    only, and only its E entries above the threshold are kept: usually a tiny fraction of the B*K*K pairs, so never
    B x K x K floats (RPN training at 800 px: 2 images x 5 levels x 2000^2 = 40M pairs, 160 MB as one float tensor).
    One host synchronization (torch.where) per block.
    """
    B, K = valid.shape
    area = box_area(boxes)  # (B, K)
    x1, y1, x2, y2 = boxes.unbind(dim=2)  # (B, K) each
    lengths = [K] * B if lengths is None else list(lengths)
    block = nms_block(boxes.device)
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


def padded_nms(boxes, scores, valid, iou_threshold, lengths=None):
    """Greedy NMS in each row of a padded batch: boxes (B, K, 4), scores (B, K), valid (B, K) bool -> keep (B, K).

    Rows are independent (the RPN's (image, level) pairs); invalid entries are padding, dropped and inert. Within a
    row the semantics are nms()'s: equal scores rank in input order. Work: B*K*K pairs, in blocks (nms_block); with
    lengths (B numbers, all entries of row b from lengths[b] on invalid, rows of equal length next to each other),
    the sum over rows of lengths[b]^2. Sorting keeps that bound: valid entries (finite scores) sort before padding.
    """
    B, K = scores.shape
    order = torch.sort(scores.masked_fill(~valid, -math.inf), dim=1, descending=True, stable=True).indices  # (B, K)
    sorted_boxes = boxes.gather(1, order[..., None].expand(B, K, 4))  # (B, K, 4), each row by decreasing score
    sorted_valid = valid.gather(1, order)  # (B, K): padding last (or among the -inf scores, where it is inert)
    src, dst = _suppression_pairs(sorted_boxes, sorted_valid, None, iou_threshold, lengths)
    keep_sorted = _greedy_fixed_point(src, dst, sorted_valid.reshape(-1)).view(B, K)  # (B*K,) -> (B, K)
    return torch.zeros_like(valid).scatter_(1, order, keep_sorted)  # (B, K) back in input order


def nms(boxes, scores, iou_threshold):
    """Greedy non-maximum suppression (Faster R-CNN Sec. 3.3), without a Python loop over boxes.

    Returns int64 indices of the kept boxes, by decreasing score; a box is dropped if its IoU with a kept,
    higher-scoring box is > iou_threshold (torchvision semantics). Equal scores keep their input order (stable sort).
    """
    return _one_row_nms(boxes, scores, None, iou_threshold)


def _one_row_nms(boxes, scores, idxs, iou_threshold):
    """nms() of (N, 4) boxes as one row of pairs; with idxs (N,), only boxes of the same group suppress each other.
    -> kept indices, by decreasing score, ties in input order."""
    order = torch.sort(scores, descending=True, stable=True).indices  # (N,)
    valid = torch.ones((1, order.shape[0]), dtype=torch.bool, device=boxes.device)  # (1, N): one row, no padding
    groups = None if idxs is None else idxs[order][None]  # (1, N)
    src, dst = _suppression_pairs(boxes[order][None], valid, groups, iou_threshold)  # box src suppresses dst
    return order[_greedy_fixed_point(src, dst, valid[0])]


def batched_nms(boxes, scores, idxs, iou_threshold):
    """NMS done independently per group (class, image or FPN level) given by idxs (N,); same contract as nms().

    All groups at once, with no loop over them: boxes are sorted by score (stable) and S[i, j] also needs
    idxs[i] == idxs[j], so the pairs are those of one N x N matrix (in blocks, see _suppression_pairs) and the fixed
    point runs once for all groups. Exact, unlike torchvision's trick of offsetting each group's coordinates (which
    rounds them). The work is N^2 pairs instead of the sum of the squared group sizes: fine for detections (a few
    thousand boxes, one block of pairs, no host sync before the fixed point). Above one block, when padding every
    group to the largest one (G x K x K pairs) is cheaper, the groups go through padded_nms instead (two host syncs
    to find G and K). The RPN, whose groups are known in advance, calls padded_nms itself.
    """
    n = scores.shape[0]
    if n * n > nms_block(boxes.device):  # over one block of pairs: padding each group to the largest may cost less
        group_ids, group, counts = torch.unique(idxs, return_inverse=True, return_counts=True)  # (G,), (N,), (G,)
        G, K = group_ids.shape[0], int(counts.max())  # host syncs
        if G * K * K < n * n:
            by_group = torch.sort(group, stable=True).indices  # (N,) grouped, input order inside a group
            slot = torch.arange(K, device=idxs.device)  # (K,)
            valid = slot < counts[:, None]  # (G, K) False: padding
            index = by_group[((torch.cumsum(counts, 0) - counts)[:, None] + slot).clamp(max=n - 1)]  # (G, K)
            kept = torch.sort(index[padded_nms(boxes[index], scores[index], valid, iou_threshold)]).values
            return kept[torch.sort(scores[kept], descending=True, stable=True).indices]
    return _one_row_nms(boxes, scores, idxs, iou_threshold)


class Matcher:
    """Assign each prediction the ground-truth box it overlaps most (Faster R-CNN Sec. 3.1.2).

    IoU >= high_threshold: matched (>= as in Detectron/torchvision; the paper says "higher than 0.7").
    low_threshold <= IoU < high_threshold: BETWEEN_THRESHOLDS (ignored). IoU < low_threshold: BELOW_LOW_THRESHOLD.
    allow_low_quality_matches: rule (i) of Sec. 3.1.2, "the anchor/anchors with the highest IoU with a ground-truth
    box" is positive even below high_threshold; every tied best prediction of each gt gets its own best gt.
    """

    BELOW_LOW_THRESHOLD = -1
    BETWEEN_THRESHOLDS = -2

    def __init__(self, high_threshold, low_threshold, allow_low_quality_matches=False):
        assert low_threshold <= high_threshold, f"low_threshold {low_threshold} > high_threshold {high_threshold}"
        self.high_threshold = high_threshold
        self.low_threshold = low_threshold
        self.allow_low_quality_matches = allow_low_quality_matches

    def __call__(self, iou):
        """iou (G, P) -> matched_idx (P,) int64 in [0, G) or one of the two negative sentinels."""
        assert iou.shape[0] > 0, "Matcher needs at least one ground-truth box; handle G == 0 in the caller"
        if iou.shape[1] == 0:
            return torch.empty((0,), dtype=torch.int64, device=iou.device)
        best_iou, best_gt = iou.max(dim=0)  # (P,), (P,): best gt for every prediction
        # torch.where with three arguments, not boolean indexing: no host sync (this runs for every image)
        matched = torch.where(best_iou < self.low_threshold, self.BELOW_LOW_THRESHOLD, best_gt)
        matched = torch.where((best_iou >= self.low_threshold) & (best_iou < self.high_threshold),
                              self.BETWEEN_THRESHOLDS, matched)
        if self.allow_low_quality_matches:
            best_for_gt = iou.max(dim=1).values  # (G,): each gt's highest IoU over all predictions
            is_best = (iou == best_for_gt[:, None]).any(dim=0)  # (P,) the best prediction of some gt, ties too
            matched = torch.where(is_best, best_gt, matched)  # such a prediction keeps ITS best gt (maybe not this gt)
        return matched


class BalancedSampler:
    """Sample a minibatch with at most `positive_fraction` positives, filled up with negatives.

    Faster R-CNN Sec. 3.1.3: "randomly sample 256 anchors in an image ... positive and negative anchors have a ratio of
    up to 1:1. If there are fewer than 128 positive samples in an image, we pad the mini-batch with negative ones."
    The random calls (one randperm for positives, then one for negatives) are the same as torchvision's sampler.
    """

    def __init__(self, batch_size_per_image, positive_fraction):
        self.batch_size_per_image = batch_size_per_image
        self.positive_fraction = positive_fraction

    def __call__(self, labels):
        """labels (P,): 1 positive, 0 negative, -1 ignore -> (pos_idx, neg_idx), int64 indices into labels."""
        positive = torch.where(labels >= POSITIVE)[0]
        negative = torch.where(labels == NEGATIVE)[0]
        num_pos = min(positive.numel(), int(self.batch_size_per_image * self.positive_fraction))
        num_neg = min(negative.numel(), self.batch_size_per_image - num_pos)
        pos_idx = positive[torch.randperm(positive.numel(), device=labels.device)[:num_pos]]
        neg_idx = negative[torch.randperm(negative.numel(), device=labels.device)[:num_neg]]
        return pos_idx, neg_idx
