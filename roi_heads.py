"""RoI heads of Mask R-CNN: the box head, and RoIHeads, which samples RoIs, runs the box head and hands RoIs to the
mask and keypoint heads.

Fast R-CNN, Girshick 2015 (arXiv:1504.08083) Sec. 2: RoI features -> fc layers -> two sibling outputs (class scores
and per-class box deltas), multi-task loss Eq. 1, RoI sampling (25% foreground at IoU >= 0.5).
Mask R-CNN, He et al. 2017 (arXiv:1703.06870) Sec. 3: RoIAlign (Fig. 3; roi_align.py), the branches that run on the
positive RoIs in training and on the detections at test (the mask head, masks.py; the keypoint head, keypoints.py);
Sec. 3.1 "Inference": per-class NMS of the detections.
Rethinking ImageNet Pre-training (arXiv:1811.08883) Sec. 4: the box head is "4conv1fc" with GN (Wu & He 2018).
Sampling, losses and post-processing follow torchvision's RoIHeads, the reference of tests/test_roi_heads.py.

A branch (MaskHead, KeypointHead) has loss(features, rois, labels, matched, targets, image_shape) -> {name: loss}
on the positive RoIs and predict(features, detections, image_shape), which adds its outputs to each detection.
RoIHeads and cascade.CascadeRoIHeads share one interface: the attributes mask_head, keypoint_head (None where
absent), nms_thresh, detections_per_img; detect(...) -> box detections; forward(...) -> losses or detections.

Shapes: N images, C channels, R RoIs (R_i of image i), S pooled side (7), K classes incl. background, G ground-truth
boxes, P positive RoIs (P_i of image i), D detections.
"""
import torch
import torch.nn.functional as F
from torch import nn

import fast_ops
from backbone import msra_init_
from boxes import BalancedSampler, BoxCoder, Matcher, batched_nms, big_enough, box_iou, clip_boxes
from distributed import loss_denominator
from norm import head_convs
from roi_align import multilevel_roi_align

BACKGROUND = 0  # class 0 (Fast R-CNN Sec. 2: "K object classes plus a catch-all background class")


class BoxHead(nn.Module):
    """RoI feature -> box feature: num_convs x (3x3 conv + norm + ReLU), flatten, num_fcs x (fc + ReLU).

    Rethinking Sec. 4 uses "4conv1fc" with GN (num_convs=4, num_fcs=1, the default); num_convs=0, num_fcs=2,
    norm="none" is the "2fc" head of FPN Sec. 4.2 and torchvision's TwoMLPHead (its fc6, fc7 = fcs.0, fcs.1).
    """

    def __init__(self, in_channels=256, resolution=7, num_convs=4, conv_dim=256, num_fcs=1, fc_dim=1024, norm="gn",
                 num_groups=32):
        super().__init__()
        self.convs = head_convs(in_channels, num_convs, conv_dim, norm, num_groups)
        msra_init_(self.convs)  # as Detectron2 and torchvision
        channels = conv_dim if num_convs else in_channels
        self.fcs = nn.ModuleList()
        features = channels * resolution * resolution
        for _ in range(num_fcs):
            fc = nn.Linear(features, fc_dim)
            # Caffe2's XavierFill, bias 0: Detectron's FC default, Detectron2's c2_xavier_fill (kaiming uniform, a=1).
            # torchvision's TwoMLPHead keeps nn.Linear's default init (a random tv_maskrcnn_v1 differs there).
            nn.init.kaiming_uniform_(fc.weight, a=1)
            nn.init.zeros_(fc.bias)
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


def fast_rcnn_loss(class_logits, box_deltas, labels, regression_targets, beta=1.0):
    """Fast R-CNN Eq. 1: L = L_cls + [u >= 1] L_loc; logits (R, K), deltas (R, K*4) or (R, 4) class-agnostic,
    labels (R,), targets (R, 4) -> (loss_cls, loss_box), two scalars (the model sums them with the other losses).

    L_cls is the mean cross-entropy over the sampled RoIs. L_loc is smooth-L1 on the ground-truth class's deltas of the
    foreground RoIs, summed and divided by all R sampled RoIs (torchvision; Detectron does the same). With several
    processes R is the joint batch's (distributed.loss_denominator).
    beta: the smooth-L1 quadratic zone, 1 in Fast R-CNN Eq. 3 and in Detectron (the paper's code: Caffe2's
    SmoothL1Loss default; maskrcnn-benchmark beta=1); torchvision uses 1/9 (its tv_maskrcnn_v1 preset here).
    """
    n_rois = loss_denominator(labels.numel(), device=labels.device)
    loss_cls = F.cross_entropy(class_logits, labels, reduction="sum") / n_rois
    fg = labels > BACKGROUND  # (R,) Iverson bracket [u >= 1], as a mask: no host sync to list the foreground
    box_deltas = box_deltas.reshape(box_deltas.shape[0], box_deltas.shape[1] // 4, 4)  # (R, K or 1, 4)
    column = labels if box_deltas.shape[1] > 1 else 0  # the GT class's deltas (sampled labels are >= 0), or the only
    loss_box = F.smooth_l1_loss(box_deltas[torch.arange(labels.shape[0], device=labels.device), column],
                                regression_targets, beta=beta, reduction="none")  # (R, 4) Fast R-CNN Eq. 3
    return loss_cls, torch.where(fg[:, None], loss_box, 0.0).sum() / n_rois


class RoIHeads(nn.Module):
    """Sample RoIs, pool them, run the box head and hand RoIs to the branches (mask_head, keypoint_head, or None):
    losses in training, detections in eval."""

    plain_ops = False  # True (build_model(plain_ops=True)): the plain RoIAlign and NMS of roi_align.py and boxes.py

    def __init__(self, box_head, box_predictor, mask_head=None, fg_iou=0.5, bg_iou=0.5, batch_size_per_image=512,
                 positive_fraction=0.25, bbox_reg_weights=(10.0, 10.0, 5.0, 5.0), score_thresh=0.05, nms_thresh=0.5,
                 detections_per_img=100, box_resolution=7, sampling_ratio=2, aligned=False, box_loss_beta=1.0,
                 keypoint_head=None):
        super().__init__()
        self.box_head, self.box_predictor = box_head, box_predictor
        self.mask_head = mask_head  # masks.MaskHead (Mask R-CNN Sec. 3) or None (Faster R-CNN)
        self.keypoint_head = keypoint_head  # keypoints.KeypointHead (Mask R-CNN Sec. 5) or None
        # Fast R-CNN Sec. 2.3: foreground at IoU >= 0.5; Detectron/torchvision make everything below 0.5 background
        # (the paper's background is [0.1, 0.5)). No low-quality matches: GT boxes are among the proposals anyway.
        self.matcher = Matcher(fg_iou, bg_iou, allow_low_quality_matches=False)
        # Mask R-CNN Sec. 3.1: 512 RoIs per image for FPN, positive-to-negative 1:3 (Fast R-CNN's 25% foreground)
        self.sampler = BalancedSampler(batch_size_per_image, positive_fraction)
        # (10, 10, 5, 5) replaces Fast R-CNN's normalisation of the targets to zero mean and unit variance
        self.box_coder = BoxCoder(weights=bbox_reg_weights)
        self.box_loss_beta = box_loss_beta  # smooth-L1 beta of L_loc (fast_rcnn_loss)
        self.score_thresh, self.nms_thresh, self.detections_per_img = score_thresh, nms_thresh, detections_per_img
        self.box_resolution, self.sampling_ratio, self.aligned = box_resolution, sampling_ratio, aligned

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

    def box_outputs(self, features, rois, image_shape):
        """RoIs [(R_i, 4)] pooled 7 x 7 from their FPN levels -> class logits (R, K), box deltas (R, K*4)."""
        pool = multilevel_roi_align if self.plain_ops else fast_ops.multilevel_roi_align
        pooled = pool(features, rois, image_shape, self.box_resolution, self.sampling_ratio, self.aligned)
        return self.box_predictor(self.box_head(pooled))  # (R, C, 7, 7) -> (R, K), (R, K*4)

    def detect(self, features, proposals, image_shape, image_sizes):
        """Box detections (Mask R-CNN Sec. 3.1 "Inference"; torchvision's postprocess_detections): the box head on
        the proposals [(R_i, 4)], per-class boxes, background and scores <= score_thresh dropped, class-wise NMS,
        the top detections_per_img -> per image {"boxes" (D, 4), "labels" (D,), "scores" (D,)}."""
        class_logits, box_deltas = self.box_outputs(features, proposals, image_shape)  # (R, K), (R, K*4)
        K = class_logits.shape[1]
        deltas = box_deltas.reshape(box_deltas.shape[0], box_deltas.shape[1] // 4, 4)  # (R, K, 4)
        boxes = self.box_coder.decode(deltas, torch.cat(proposals)).expand(-1, K, 4)  # (R, K, 4)
        nms = batched_nms if self.plain_ops else fast_ops.batched_nms
        return select_detections(F.softmax(class_logits, dim=-1), boxes, [p.shape[0] for p in proposals],
                                 image_sizes, self.score_thresh, self.nms_thresh, self.detections_per_img, nms)

    def forward(self, features, proposals, image_shape, image_sizes, targets=None):
        """features [P2..P5] (N, C, H/4, W/4) ...; proposals [(R_i, 4)]; image_shape (H, W) of the padded batch;
        image_sizes [(h, w)] before padding; targets [{"boxes" (G, 4), "labels" (G,), "masks" (G, h, w)}].
        Training returns the losses {"loss_cls", "loss_box"} and each branch's ("loss_mask", "loss_keypoint").
        Eval returns detect(...)'s detections, to which each branch adds its outputs: "mask_probs" (D, 1, M, M);
        "keypoints" (D, K, 3) and "keypoint_scores" (D, K) (keypoints.py)."""
        if not self.training:
            return predict_with_branches(self, features, proposals, image_shape, image_sizes)
        assert targets is not None, "RoIHeads needs targets in training"
        rois, labels, matched, regression_targets = self.sample_rois(proposals, targets)
        class_logits, box_deltas = self.box_outputs(features, rois, image_shape)  # (R, K), (R, K*4)
        loss_cls, loss_box = fast_rcnn_loss(class_logits, box_deltas, labels, regression_targets, self.box_loss_beta)
        return {"loss_cls": loss_cls, "loss_box": loss_box,
                **branch_losses(self, features, rois, labels, matched, targets, image_shape)}


def predict_with_branches(heads, features, proposals, image_shape, image_sizes):
    """Eval of RoIHeads or cascade.CascadeRoIHeads: heads.detect's box detections, to which each branch
    (heads.mask_head, heads.keypoint_head) adds its outputs (Mask R-CNN Sec. 3.1: the branches run on the
    detections)."""
    detections = heads.detect(features, proposals, image_shape, image_sizes)
    for head in (heads.mask_head, heads.keypoint_head):
        if head is not None:
            head.predict(features, detections, image_shape)
    return detections


def branch_losses(heads, features, rois, labels, matched, targets, image_shape):
    """Training of the branches (heads.mask_head, heads.keypoint_head) on the positive RoIs among the sampled rois
    [(R_i, 4)], labels (R,), matched [(R_i,)] -> {"loss_mask": .., "loss_keypoint": ..} for those present."""
    losses, positives = {}, positive_rois(rois, labels, matched)
    for head in (heads.mask_head, heads.keypoint_head):
        if head is not None:
            losses.update(head.loss(features, *positives, targets, image_shape))
    return losses


def positive_rois(rois, labels, matched):
    """The foreground of sampled RoIs, which the mask and keypoint branches learn from (Mask R-CNN Sec. 3: L_mask
    "is defined only on positive RoIs"): rois [(R_i, 4)], labels (R,), matched [(R_i,)] GT index, as
    RoIHeads.sample_rois returns them -> rois [(P_i, 4)], labels (P,), matched [(P_i,)]."""
    fg = labels > BACKGROUND  # (R,)
    per_image = fg.split([r.shape[0] for r in rois])  # [(R_i,)]
    return [r[f] for r, f in zip(rois, per_image)], labels[fg], [m[f] for m, f in zip(matched, per_image)]


def select_detections(scores, boxes, per_image, image_sizes, score_thresh, nms_thresh, detections_per_img,
                      nms=batched_nms):
    """Class probabilities (R, K) and boxes (R, K, 4) of the RoIs of all images (per_image of them per image)
    -> per image {"boxes" (D, 4), "labels" (D,), "scores" (D,)}: boxes clipped to the image, background dropped,
    scores > score_thresh, NMS per class at nms_thresh (nms: boxes.batched_nms or fast_ops.batched_nms), the
    detections_per_img best (Mask R-CNN Sec. 3.1 "Inference"; torchvision's postprocess_detections)."""
    detections = []
    for s, b, size in zip(scores.split(per_image), boxes.split(per_image), image_sizes):  # one image at a time
        b, s = clip_boxes(b[:, 1:], size), s[:, 1:]  # (R_i, K-1, 4), (R_i, K-1): background dropped
        # scores > score_thresh, and boxes of at least 0.01 pixel (torchvision's remove_small_boxes)
        roi, column = torch.where((s > score_thresh) & big_enough(b, 1e-2))  # RoI-major, class-minor as torchvision
        b, s, labels = b[roi, column], s[roi, column], column + 1
        keep = nms(b, s, labels, nms_thresh)[:detections_per_img]  # NMS per class, by decreasing score
        detections.append({"boxes": b[keep], "labels": labels[keep], "scores": s[keep]})
    return detections
