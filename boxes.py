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


def clip_boxes(boxes, size):
    """Clamp (..., 4) boxes into their image. size: (h, w), or a tensor of upper bounds (w, h, w, h) broadcasting
    against boxes (fast_ops clips the boxes of several images at once)."""
    limits = size if isinstance(size, torch.Tensor) else boxes.new_tensor([size[1], size[0], size[1], size[0]])
    return torch.min(boxes.clamp(min=0), limits)  # (..., 4) against (4,) or (..., 4)


def big_enough(boxes, min_size):
    """(..., 4) boxes -> (...,) bool: width and height both >= min_size."""
    return (boxes[..., 2] - boxes[..., 0] >= min_size) & (boxes[..., 3] - boxes[..., 1] >= min_size)


def remove_small_boxes(boxes, min_size):
    """Indices of the (N, 4) boxes whose width and height are both >= min_size."""
    return torch.where(big_enough(boxes, min_size))[0]


def nms(boxes, scores, iou_threshold):
    """Greedy non-maximum suppression (Faster R-CNN Sec. 3.3): boxes (N, 4), scores (N,) -> int64 indices of the kept
    boxes, by decreasing score (equal scores in input order), with the semantics of torchvision.ops.nms.

    Keep the highest-scoring box left, drop every box that overlaps it by an IoU above the threshold, repeat.
    """
    order = torch.sort(scores, descending=True, stable=True).indices  # (N,) the candidates, best first
    keep = []
    while order.numel() > 0:
        best, rest = order[0], order[1:]
        keep.append(best)
        iou = box_iou(boxes[best, None], boxes[rest])[0]  # (len(rest),) overlap of each remaining box with the best
        order = rest[~(iou > iou_threshold)]  # drop those it suppresses (a NaN IoU of empty boxes suppresses none)
    return torch.stack(keep) if keep else order


def batched_nms(boxes, scores, idxs, iou_threshold):
    """nms() within each group of idxs (N,), e.g. a class, an image or an FPN level: boxes of different groups never
    suppress each other. Same contract as nms(): kept indices by decreasing score, equal scores in input order."""
    kept = [torch.zeros(0, dtype=torch.int64, device=boxes.device)]
    for group in torch.unique(idxs):  # one group at a time
        members = torch.where(idxs == group)[0]
        kept.append(members[nms(boxes[members], scores[members], iou_threshold)])
    kept = torch.sort(torch.cat(kept)).values  # input order, so that the stable sort below keeps ties in it
    return kept[torch.sort(scores[kept], descending=True, stable=True).indices]


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
