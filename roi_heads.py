"""RoI heads of Mask R-CNN: RoIAlign, FPN level assignment, the box head and the RoIHeads module.

Fast R-CNN, Girshick 2015 (arXiv:1504.08083) Sec. 2: RoI features -> fc layers -> two sibling outputs (class scores
and per-class box deltas), multi-task loss Eq. 1, RoI sampling (25% foreground at IoU >= 0.5).
Mask R-CNN, He et al. 2017 (arXiv:1703.06870) Sec. 3: RoIAlign (Fig. 3), the mask branch (in masks.py) and L_mask.
FPN, Lin et al. 2017 (arXiv:1612.03144) Sec. 4.2, Eq. 1: the pyramid level an RoI is pooled from.
Rethinking ImageNet Pre-training (arXiv:1811.08883) Sec. 4: the box head is "4conv1fc" with GN (Wu & He 2018).
Sampling, losses and post-processing follow torchvision's RoIHeads, the reference of tests/test_roi_heads.py.

Shapes: N images, C channels, H, W feature map, R RoIs, S, Q pooled height and width (7 box, 14 mask),
GY, GX sampling points per bin along y and x, K classes incl. background, G ground-truth boxes, D detections.
"""
import math

import torch
import torch.nn.functional as F
from torch import nn

from boxes import BalancedSampler, BoxCoder, Matcher, batched_nms, box_area, box_iou, clip_boxes, remove_small_boxes
from distributed import loss_denominator
from masks import MaskHead, mask_loss, paste_masks
from norm import make_norm

__all__ = ["roi_align", "map_levels", "multilevel_roi_align", "mask_targets", "BoxHead", "BoxPredictor", "MaskHead",
           "RoIHeads", "fast_rcnn_loss", "paste_masks"]

OUTSIDE = -3.0  # a normalized grid_sample coordinate off the map: the sample reads the zero padding, i.e. adds 0
BACKGROUND = 0  # class 0 (Fast R-CNN Sec. 2: "K object classes plus a catch-all background class")


def as_rois(boxes):
    """(R, 5) rois (batch index, x1, y1, x2, y2), or a list of (R_i, 4) boxes per image -> (R, 5) rois."""
    if isinstance(boxes, torch.Tensor):
        assert boxes.dim() == 2 and boxes.shape[1] == 5, f"rois must be (R, 5), got {tuple(boxes.shape)}"
        return boxes
    index = [torch.full_like(b[:, :1], i) for i, b in enumerate(boxes)]  # (R_i, 1) image index of each box
    return torch.cat([torch.cat(index), torch.cat(boxes)], dim=1)  # (R, 5)


def sample_points(start, size, bins, grid, max_grid, length):
    """RoIAlign's regular sampling points along one axis (Mask R-CNN Fig. 3), as torchvision's kernel places them.

    start, size (R,): RoI start and extent in feature-map pixels; bins: pooled cells; grid (R,): points per cell;
    length: the map's extent, a number or (R,) per RoI (RoIs pooled from different FPN levels).
    Returns points (R, bins, max_grid) clamped into [0, length - 1], and keep (R, bins, max_grid): False for the
    padding points beyond an RoI's own grid and for points outside [-1, length], which torchvision counts as 0.
    """
    if isinstance(length, torch.Tensor):
        length = length[:, None, None]  # (R, 1, 1)
    bin_size = size / bins  # (R,)
    cell = torch.arange(bins, device=start.device, dtype=start.dtype)  # (bins,)
    point = torch.arange(max_grid, device=start.device, dtype=start.dtype)  # (max_grid,)
    # bin start + (i + 1/2) * bin_size / grid: `grid` points spread evenly inside each cell, none on its border
    pts = (start[:, None, None] + cell[None, :, None] * bin_size[:, None, None]
           + (point[None, None, :] + 0.5) * bin_size[:, None, None] / grid.clamp(min=1)[:, None, None])
    keep = (point[None, None, :] < grid[:, None, None]) & (pts >= -1.0) & (pts <= length)
    return pts.clamp(min=0).clamp_(max=length - 1), keep


def roi_align(input, boxes, output_size, spatial_scale=1.0, sampling_ratio=-1, aligned=False):
    """RoIAlign (Mask R-CNN Sec. 3, Fig. 3) with the signature and semantics of torchvision.ops.roi_align.

    input (N, C, H, W); boxes (R, 5) as (batch index, x1, y1, x2, y2) or a list of (R_i, 4) per image, in image
    pixels (times spatial_scale gives map pixels). Each RoI is cut into S x Q cells; each cell averages the bilinear
    values at GY x GX regular points (sampling_ratio each, or ceil(RoI side / cells) per RoI when <= 0).
    aligned=False is Mask R-CNN's original RoIAlign (no half-pixel shift, RoI sides at least 1 pixel);
    aligned=True shifts by -0.5 so that pixel centres are at integer + 0.5 (Detectron2's ROIAlignV2).
    Returns (R, C, S, Q).
    """
    rois = as_rois(boxes)
    return pool_levels([input], rois, torch.zeros_like(rois[:, 0], dtype=torch.int64), [spatial_scale], output_size,
                       sampling_ratio, aligned)


def pool_levels(features, rois, levels, scales, output_size, sampling_ratio, aligned):
    """RoIAlign of each RoI (R, 5) from the map features[levels[r]] (N, C, H_l, W_l) at scale scales[levels[r]].

    All points are sampled by grid_sample (no loop over RoIs): a point x in map pixels is at the normalized
    coordinate (2x + 1) / W - 1 for align_corners=False, and bilinear weights then equal torchvision's. The points of
    every RoI are computed at once; grid_sample pairs grid and input batch entries one to one, so it runs once per
    (level, image) on that pair's RoIs, made contiguous by one sort. One host sync: the RoI count of every pair.
    """
    S, Q = (output_size, output_size) if isinstance(output_size, int) else tuple(output_size)
    N, C = features[0].shape[:2]
    L, R = len(features), rois.shape[0]
    # grid_sample's grid has the input's dtype; fp16/bf16 coordinates would be off by up to a pixel, so sample in fp32.
    maps = [f if f.dtype in (torch.float32, torch.float64) else f.float() for f in features]
    rois = rois.to(maps[0].dtype)
    table = rois.new_empty((L, 3))  # per level: scale, H, W (fills, not a host-to-device copy)
    for row, scale, f in zip(table, scales, features):
        row[0], row[1], row[2] = scale, f.shape[-2], f.shape[-1]
    scale, H, W = table[levels].unbind(dim=1)  # (R,) each
    offset = 0.5 if aligned else 0.0
    x1, y1, x2, y2 = (rois[:, 1:] * scale[:, None] - offset).unbind(dim=1)  # (R,) each, in map pixels
    roi_w, roi_h = x2 - x1, y2 - y1
    if not aligned:
        roi_w, roi_h = roi_w.clamp(min=1.0), roi_h.clamp(min=1.0)  # Mask R-CNN: no RoI thinner than one pixel
    if sampling_ratio > 0:
        grid_y = grid_x = torch.full_like(roi_h, sampling_ratio)
        GY = GX = sampling_ratio
    else:
        # adaptive: ceil(side / cells) points per cell, per RoI; all RoIs use the largest grid, masked per RoI
        grid_y, grid_x = torch.ceil(roi_h / S).clamp(min=0), torch.ceil(roi_w / Q).clamp(min=0)
        GY, GX = torch.stack([grid_y.max(), grid_x.max()]).clamp(min=1).int().tolist() if R else (1, 1)  # host sync
    ys, keep_y = sample_points(y1, roi_h, S, grid_y, GY, H)  # (R, S, GY)
    xs, keep_x = sample_points(x1, roi_w, Q, grid_x, GX, W)  # (R, Q, GX)
    # A dropped point goes off the map on one axis, so grid_sample's zero padding makes it count 0 (any other axis).
    gy = torch.where(keep_y, (2 * ys + 1) / H[:, None, None] - 1, OUTSIDE)  # (R, S, GY)
    gx = torch.where(keep_x, (2 * xs + 1) / W[:, None, None] - 1, OUTSIDE)  # (R, Q, GX)
    grid = torch.stack([gx[:, None, :, None, :].expand(R, S, Q, GY, GX),
                        gy[:, :, None, :, None].expand(R, S, Q, GY, GX)], dim=-1)  # (R, S, Q, GY, GX, 2) as (x, y)

    pair = levels * N + rois[:, 0].long()  # (R,) the (level, image) each RoI is pooled from
    order = torch.sort(pair, stable=True).indices  # (R,) RoIs grouped by pair
    counts = torch.bincount(pair, minlength=L * N).tolist()  # host sync: RoIs per (level, image)
    assert len(counts) == L * N, f"roi batch indices must lie in [0, {N})"
    grid = grid[order].reshape(R, S * Q, GY * GX, 2)  # (R, S*Q, GY*GX, 2): a cell's points side by side, to average
    pooled, start = [], 0
    for p, count in enumerate(counts):  # loop over (level, image) pairs, not RoIs
        if count:
            level, n = divmod(p, N)
            points = grid[start:start + count].reshape(1, count * S * Q, GY * GX, 2)  # that pair's RoIs as one grid
            samples = F.grid_sample(maps[level][n:n + 1], points, mode="bilinear", padding_mode="zeros",
                                    align_corners=False)  # (1, C, count*S*Q, GY*GX)
            pooled.append(samples.mean(dim=-1).reshape(C, count, S, Q).permute(1, 0, 2, 3))  # (count, C, S, Q)
            start += count
    if not pooled:
        return maps[0].new_zeros((R, C, S, Q)).to(features[0].dtype)
    out = torch.cat(pooled)  # (R, C, S, Q) in the order of `order`
    if sampling_ratio <= 0:  # adaptive: torchvision divides an RoI's sum by its own count grid_y * grid_x (>= 1)
        out = out * ((GY * GX) / (grid_y * grid_x).clamp(min=1))[order, None, None, None]
    return out.new_empty(out.shape).index_copy(0, order, out).to(features[0].dtype)  # back in the order of rois


def map_levels(boxes, k_min=2, k_max=5, canonical_size=224, canonical_level=4):
    """FPN Eq. 1: the pyramid level P_k an RoI (R, 4) is pooled from -> (R,) int64 level k in [k_min, k_max]."""
    side = torch.sqrt(box_area(boxes))  # (R,) sqrt(w * h)
    # FPN Eq. (1): k = floor(k0 + log2(sqrt(wh) / 224)), k0 = 4; +1e-6 as torchvision, so 448 maps exactly to 5
    level = torch.floor(canonical_level + torch.log2(side / canonical_size) + 1e-6)
    return level.clamp(min=k_min, max=k_max).to(torch.int64)


def multilevel_roi_align(features, boxes, image_shape, output_size, sampling_ratio=2, aligned=False):
    """RoIAlign each RoI from its FPN level (Eq. 1): features [P2..P5] (N, C, H_k, W_k), boxes [(R_i, 4) per image]
    in pixels of the padded batch of size image_shape (H, W) -> (sum R_i, C, S, S), as torchvision MultiScaleRoIAlign.
    """
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
    RoIAlign is separable: its points form a grid ys x xs and a bilinear weight is wy * wx, so a cell's average is
    (Ay @ mask @ Bx^T)[cell] with Ay (M, h), Bx (M, w) each axis's interpolation weights averaged over the cell's
    points. For one-channel masks this is two matrix products instead of up to ~30 x 30 points per cell for big
    objects. Ay is sparse and picks each RoI's own GT mask: it is one (P*M, G*h) sparse matrix.
    """
    P, (G, h, w) = rois.shape[0], gt_masks.shape
    if P == 0:
        return rois.new_zeros((0, M, M))
    x1, y1, x2, y2 = rois.unbind(dim=1)  # (P,) each
    roi_w, roi_h = (x2 - x1).clamp(min=1.0), (y2 - y1).clamp(min=1.0)  # aligned=False: at least one pixel
    grid_y, grid_x = torch.ceil(roi_h / M), torch.ceil(roi_w / M)  # (P,) adaptive sampling, at least 1
    GY, GX = torch.stack([grid_y.max(), grid_x.max()]).int().tolist()  # host sync: the largest grids
    ys, keep_y = sample_points(y1, roi_h, M, grid_y, GY, h)  # (P, M, GY)
    xs, keep_x = sample_points(x1, roi_w, M, grid_x, GX, w)  # (P, M, GX)

    def interpolation(pts, keep, grid, length):  # -> (P, M, 2*G*) pixel indices and averaged bilinear weights
        low = pts.floor()
        frac = pts - low
        weight = keep / grid[:, None, None]  # each point's share of the cell's average
        index = torch.cat([low, (low + 1).clamp(max=length - 1)], dim=-1).to(torch.int64)
        return index, torch.cat([(1 - frac) * weight, frac * weight], dim=-1)

    iy, wy = interpolation(ys, keep_y, grid_y, h)  # (P, M, 2GY)
    ix, wx = interpolation(xs, keep_x, grid_x, w)  # (P, M, 2GX)
    Bx = wx.new_zeros((P, M, w)).scatter_add_(2, ix, wx)  # (P, M, w)
    row = torch.arange(P * M, device=rois.device).repeat_interleave(iy.shape[-1])  # (P*M*2GY,) (RoI, cell) row
    col = (gt_index.to(torch.int64)[:, None, None] * h + iy).reshape(-1)  # (P*M*2GY,) row of the stacked GT masks
    Ay = torch.sparse_coo_tensor(torch.stack([row, col]), wy.reshape(-1).float(), (P * M, G * h),
                                 check_invariants=True)  # (P*M, G*h)
    with torch.autocast(rois.device.type, enabled=False):  # targets need no gradient; sparse mm has no bf16 kernel
        rows_pooled = torch.sparse.mm(Ay, gt_masks.reshape(G * h, w).float())  # (P*M, w); duplicates add
        return rows_pooled.reshape(P, M, w) @ Bx.float().transpose(1, 2)  # (P, M, w) @ (P, w, M) -> (P, M, M)


class BoxHead(nn.Module):
    """RoI feature -> box feature: num_convs x (3x3 conv + norm + ReLU), flatten, num_fcs x (fc + ReLU).

    Rethinking Sec. 4 uses "4conv1fc" with GN (num_convs=4, num_fcs=1, the default); num_convs=0, num_fcs=2,
    norm="none" is the "2fc" head of FPN Sec. 4.2 and torchvision's TwoMLPHead (its fc6, fc7 = fcs.0, fcs.1).
    """

    def __init__(self, in_channels=256, resolution=7, num_convs=4, conv_dim=256, num_fcs=1, fc_dim=1024, norm="gn",
                 num_groups=32):
        super().__init__()
        blocks, channels = [], in_channels
        for _ in range(num_convs):
            conv = nn.Conv2d(channels, conv_dim, 3, padding=1, bias=norm == "none")  # a norm's shift replaces bias
            nn.init.kaiming_normal_(conv.weight, mode="fan_out", nonlinearity="relu")  # MSRA, as Detectron2/torchvision
            if conv.bias is not None:
                nn.init.zeros_(conv.bias)
            blocks.append(nn.Sequential(conv, make_norm(norm, conv_dim, num_groups), nn.ReLU(inplace=True)))
            channels = conv_dim
        self.convs = nn.Sequential(*blocks)
        self.fcs = nn.ModuleList()
        features = channels * resolution * resolution
        for _ in range(num_fcs):
            fc = nn.Linear(features, fc_dim)
            if num_convs > 0:  # Detectron2's conv+fc head: c2_xavier_fill (kaiming uniform, a=1), bias 0
                nn.init.kaiming_uniform_(fc.weight, a=1)
                nn.init.zeros_(fc.bias)
            # the 2fc head keeps nn.Linear's default init, as torchvision's TwoMLPHead
            self.fcs.append(fc)
            features = fc_dim
        self.out_channels = features

    def forward(self, x):
        """x (R, C, S, S) -> (R, out_channels)."""
        x = self.convs(x).flatten(start_dim=1)  # (R, C'*S*S)
        for fc in self.fcs:
            x = F.relu(fc(x))
        return x


class BoxPredictor(nn.Module):
    """Fast R-CNN Sec. 2 sibling outputs: K class scores (background = 0 included) and 4 deltas per class.

    class_agnostic=True predicts one set of 4 deltas for all classes (Cascade R-CNN, as Detectron2 and mmdetection).
    """

    def __init__(self, in_channels, num_classes, class_agnostic=False):
        super().__init__()
        self.cls_score = nn.Linear(in_channels, num_classes)
        self.bbox_pred = nn.Linear(in_channels, 4 if class_agnostic else num_classes * 4)
        # Fast R-CNN Sec. 2.3 (and Detectron/Detectron2): N(0, 0.01^2) scores, N(0, 0.001^2) deltas, biases 0;
        # torchvision's FastRCNNPredictor keeps nn.Linear's default init instead.
        nn.init.normal_(self.cls_score.weight, std=0.01)
        nn.init.normal_(self.bbox_pred.weight, std=0.001)
        nn.init.zeros_(self.cls_score.bias)
        nn.init.zeros_(self.bbox_pred.bias)

    def forward(self, x):
        """x (R, F) -> class logits (R, K), box deltas (R, K*4), or (R, 4) when class-agnostic."""
        x = x.flatten(start_dim=1)  # (R, F)
        return self.cls_score(x), self.bbox_pred(x)


def fast_rcnn_loss(class_logits, box_deltas, labels, regression_targets):
    """Fast R-CNN Eq. 1: L = L_cls + [u >= 1] L_loc; logits (R, K), deltas (R, K*4) or (R, 4) class-agnostic,
    labels (R,), targets (R, 4).

    L_cls is the mean cross-entropy over the sampled RoIs. L_loc is smooth-L1 on the ground-truth class's deltas of the
    foreground RoIs, summed and divided by all R sampled RoIs (torchvision; Detectron does the same). With several
    processes R is the joint batch's (distributed.loss_denominator).
    """
    n_rois = loss_denominator(labels.numel(), device=labels.device)
    loss_cls = F.cross_entropy(class_logits, labels, reduction="sum") / n_rois
    fg = labels > BACKGROUND  # (R,) Iverson bracket [u >= 1], as a mask: no host sync to list the foreground
    box_deltas = box_deltas.reshape(box_deltas.shape[0], box_deltas.shape[1] // 4, 4)  # (R, K or 1, 4)
    column = labels.clamp(min=0) if box_deltas.shape[1] > 1 else 0  # the GT class's deltas, or the only ones
    # Fast R-CNN Eq. 3 smooth-L1 has beta = 1; torchvision uses beta = 1/9 (a narrower quadratic zone)
    loss_box = F.smooth_l1_loss(box_deltas[torch.arange(labels.shape[0], device=labels.device), column],
                                regression_targets, beta=1 / 9, reduction="none")  # (R, 4)
    return loss_cls, torch.where(fg[:, None], loss_box, 0.0).sum() / n_rois


class RoIHeads(nn.Module):
    """Sample RoIs, pool them, run the box head (and mask, keypoint heads); losses in training, detections in eval."""

    def __init__(self, box_head, box_predictor, mask_head=None, fg_iou=0.5, bg_iou=0.5, batch_size_per_image=512,
                 positive_fraction=0.25, bbox_reg_weights=(10.0, 10.0, 5.0, 5.0), score_thresh=0.05, nms_thresh=0.5,
                 detections_per_img=100, box_resolution=7, mask_resolution=14, sampling_ratio=2, aligned=False,
                 keypoint_head=None):
        super().__init__()
        self.box_head, self.box_predictor, self.mask_head = box_head, box_predictor, mask_head
        self.keypoint_head = keypoint_head  # keypoints.KeypointHead: Mask R-CNN Sec. 5, its own loss and predict
        # Fast R-CNN Sec. 2.3: foreground at IoU >= 0.5; Detectron/torchvision make everything below 0.5 background
        # (the paper's background is [0.1, 0.5)). No low-quality matches: GT boxes are among the proposals anyway.
        self.matcher = Matcher(fg_iou, bg_iou, allow_low_quality_matches=False)
        # Mask R-CNN Sec. 3.1: 512 RoIs per image for FPN, positive-to-negative 1:3 (Fast R-CNN's 25% foreground)
        self.sampler = BalancedSampler(batch_size_per_image, positive_fraction)
        # (10, 10, 5, 5) replaces Fast R-CNN's normalisation of the targets to zero mean and unit variance
        self.box_coder = BoxCoder(weights=bbox_reg_weights)
        self.score_thresh, self.nms_thresh, self.detections_per_img = score_thresh, nms_thresh, detections_per_img
        self.box_resolution, self.mask_resolution = box_resolution, mask_resolution
        self.sampling_ratio, self.aligned = sampling_ratio, aligned

    def sample_rois(self, proposals, targets):
        """Per image: add the GT boxes, match, sample. Returns RoIs [(R_i, 4)], labels (R,), matched GT [(R_i,)]
        and regression targets (R, 4), R = sum R_i."""
        rois, labels, matched, regression_targets = [], [], [], []
        for props, target in zip(proposals, targets):  # loop over images
            gt_boxes, gt_labels = target["boxes"].to(props.dtype), target["labels"]
            # GT boxes join the proposals (Detectron, torchvision): every GT has a perfect positive RoI from the start
            props = torch.cat([props.detach(), gt_boxes])  # detach: approximate joint training (Faster R-CNN Sec. 3.2)
            if gt_boxes.shape[0] == 0:  # no objects: every RoI is background
                gt_idx = torch.zeros(props.shape[0], dtype=torch.int64, device=props.device)
                cls = torch.zeros_like(gt_idx)
            else:
                match = self.matcher(box_iou(gt_boxes, props))  # (P,) GT index or a negative sentinel
                gt_idx = match.clamp(min=0)
                cls = gt_labels[gt_idx].to(torch.int64)
                cls = torch.where(match == Matcher.BELOW_LOW_THRESHOLD, BACKGROUND, cls)
                cls = torch.where(match == Matcher.BETWEEN_THRESHOLDS, -1, cls)  # ignored by the sampler
            pos, neg = self.sampler(cls.clamp(max=1))  # sampler labels: 1 positive, 0 negative, -1 ignore
            keep = torch.sort(torch.cat([pos, neg])).values  # (R_i,) in proposal order, as torchvision
            props, gt_idx, cls = props[keep], gt_idx[keep], cls[keep]
            # a GT-free image has no box to regress to; its RoIs are all background, so their (zero) targets are unused
            gt_for_roi = gt_boxes[gt_idx] if gt_boxes.shape[0] else props  # (R_i, 4)
            rois.append(props)
            labels.append(cls)
            matched.append(gt_idx)
            regression_targets.append(self.box_coder.encode(gt_for_roi, props))  # Faster R-CNN Eq. 2 targets
        return rois, torch.cat(labels), matched, torch.cat(regression_targets)

    def postprocess(self, class_logits, box_deltas, rois, image_sizes):
        """Per image: per-class boxes, drop background and scores <= score_thresh, class-wise NMS, keep the top
        detections_per_img (Mask R-CNN Sec. 3.1 "Inference"; torchvision's postprocess_detections)."""
        K = class_logits.shape[1]
        deltas = box_deltas.reshape(box_deltas.shape[0], box_deltas.shape[1] // 4, 4)  # (R, K or 1, 4)
        boxes = self.box_coder.decode(deltas, torch.cat(rois)).expand(-1, K, 4)  # (R, K, 4)
        return self.detect(F.softmax(class_logits, dim=-1), boxes, [r.shape[0] for r in rois], image_sizes)

    def detect(self, scores, boxes, per_image, image_sizes):
        """Class probabilities (R, K) and boxes (R, K, 4) of the RoIs of all images (per_image of them per image)
        -> per image {"boxes" (D, 4), "labels" (D,), "scores" (D,)}.

        All images at once: one batched_nms whose groups are (image, class) pairs. Host syncs: listing the
        candidates, the NMS, and the number of detections per image."""
        K, N = scores.shape[1], len(per_image)
        limits = boxes.new_empty((boxes.shape[0], 1, 4))  # (R, 1, 4) as (w, h, w, h) of each RoI's image: fills
        image = torch.empty(boxes.shape[0], dtype=torch.int64, device=boxes.device)  # (R,) image of each RoI
        for i, (limit, img, (h, w)) in enumerate(zip(limits.split(per_image), image.split(per_image), image_sizes)):
            limit[..., 0::2], limit[..., 1::2] = w, h
            img.fill_(i)
        b = torch.min(boxes[:, 1:].clamp(min=0), limits)  # (R, K-1, 4) clipped as clip_boxes; background dropped
        s = scores[:, 1:]  # (R, K-1)
        # scores > score_thresh, and boxes of at least 0.01 pixel (torchvision's remove_small_boxes)
        candidate = (s > self.score_thresh) & (b[..., 2] - b[..., 0] >= 1e-2) & (b[..., 3] - b[..., 1] >= 1e-2)
        roi, column = torch.where(candidate)  # (D0,) each: RoI-major, class-minor, as torchvision flattens them
        b, s, labels, image = b[roi, column], s[roi, column], column + 1, image[roi]
        keep = batched_nms(b, s, image * K + labels, self.nms_thresh)  # NMS per image and class, by score
        keep = keep[torch.sort(image[keep], stable=True).indices]  # grouped by image, still by score inside
        counts = torch.bincount(image[keep], minlength=N).tolist()  # host sync: detections per image before the cap
        detections, start = [], 0
        for count in counts:
            top = keep[start:start + min(count, self.detections_per_img)]
            detections.append({"boxes": b[top], "labels": labels[top], "scores": s[top]})
            start += count
        return detections

    def forward(self, features, proposals, image_shape, image_sizes, targets=None, masks=True):
        """features [P2..P5] (N, C, H/4, W/4) ...; proposals [(R_i, 4)]; image_shape (H, W) of the padded batch;
        image_sizes [(h, w)] before padding; targets [{"boxes" (G, 4), "labels" (G,), "masks" (G, h, w)}].
        Returns (detections, losses): ([], {"loss_cls", "loss_box", "loss_mask"}) in training;
        ([{"boxes" (D, 4), "labels" (D,), "scores" (D,), "mask_probs" (D, 1, M, M)}], {}) in eval; a keypoint head
        adds "loss_keypoint", and "keypoints" (D, K, 3), "keypoint_scores" (D, K) (keypoints.py).
        masks=False skips the mask branch in eval (test-time augmentation runs it later on the merged boxes)."""
        if self.training:
            assert targets is not None, "RoIHeads needs targets in training"
            proposals, labels, matched, regression_targets = self.sample_rois(proposals, targets)
        box_features = multilevel_roi_align(features, proposals, image_shape, self.box_resolution,
                                            self.sampling_ratio, self.aligned)  # (R, C, 7, 7)
        class_logits, box_deltas = self.box_predictor(self.box_head(box_features))  # (R, K), (R, K*4)

        if self.training:
            loss_cls, loss_box = fast_rcnn_loss(class_logits, box_deltas, labels, regression_targets)
            losses = {"loss_cls": loss_cls, "loss_box": loss_box}
            if self.mask_head is not None:
                losses["loss_mask"] = self.mask_losses(features, proposals, labels, matched, targets, image_shape)
            if self.keypoint_head is not None:
                losses["loss_keypoint"] = self.keypoint_head.loss(features, proposals, labels, matched, targets,
                                                                  image_shape)
            return [], losses

        detections = self.postprocess(class_logits, box_deltas, proposals, image_sizes)
        if self.mask_head is not None and masks:
            self.add_masks(features, detections, image_shape)
        if self.keypoint_head is not None:
            self.keypoint_head.predict(features, detections, image_shape)  # adds keypoints, keypoint_scores
        return detections, {}

    def mask_losses(self, features, rois, labels, matched, targets, image_shape):
        """Mask R-CNN Sec. 3: L_mask is defined on positive RoIs only; rois [(R_i, 4)], labels (R,), matched
        [(R_i,)] GT index of each RoI (as sample_rois returns them)."""
        fg = labels > BACKGROUND  # (R,)
        counts = torch.stack([f.sum() for f in fg.split([r.shape[0] for r in rois])]).tolist()  # host sync: P_i
        # The P = sum P_i foreground indices, increasing: a stable sort puts the True entries first and in order, so
        # this is torch.where(fg)[0] with the count already known (no second host sync).
        fg = torch.sort((~fg).to(torch.uint8), stable=True).indices[:sum(counts)]  # (P,)
        fg_rois = torch.cat(rois)[fg].split(counts)  # [(P_i, 4)]
        mask_logits = self.predict_masks(features, fg_rois, image_shape)  # (P, K, M, M)
        gt = [mask_targets(t["masks"], r, m, mask_logits.shape[-1])
              for t, r, m in zip(targets, fg_rois, torch.cat(matched)[fg].split(counts))]  # [(P_i, M, M)] per image
        return mask_loss(mask_logits, labels[fg], torch.cat(gt))

    def add_masks(self, features, detections, image_shape):
        """Mask R-CNN Sec. 3.1 "Inference": the mask branch runs on the final detection boxes; adds "mask_probs"."""
        probs = self.mask_probs(features, [d["boxes"] for d in detections], [d["labels"] for d in detections],
                                image_shape)
        for d, p in zip(detections, probs):
            d["mask_probs"] = p  # (D_i, 1, M, M)

    def mask_probs(self, features, boxes, labels, image_shape):
        """The mask branch on given boxes [(D_i, 4)] of classes [(D_i,)] -> [(D_i, 1, M, M)] probabilities."""
        mask_logits = self.predict_masks(features, boxes, image_shape)  # (D, K, M, M)
        label = torch.cat(labels)  # (D,)
        # Mask R-CNN Sec. 3: only the mask of the predicted class k is used, as a per-pixel sigmoid
        probs = mask_logits[torch.arange(label.shape[0], device=label.device), label].sigmoid()  # (D, M, M)
        return list(probs[:, None].split([lab.shape[0] for lab in labels]))  # [(D_i, 1, M, M)]

    def predict_masks(self, features, boxes, image_shape):
        """[(R_i, 4)] boxes -> (R, K, 2*mask_resolution, 2*mask_resolution) mask logits."""
        pooled = multilevel_roi_align(features, boxes, image_shape, self.mask_resolution, self.sampling_ratio,
                                      self.aligned)  # (R, C, 14, 14)
        return self.mask_head(pooled)
