"""RoI heads of Mask R-CNN: the box head and the RoIHeads module (RoIAlign is in roi_align.py).

Fast R-CNN, Girshick 2015 (arXiv:1504.08083) Sec. 2: RoI features -> fc layers -> two sibling outputs (class scores
and per-class box deltas), multi-task loss Eq. 1, RoI sampling (25% foreground at IoU >= 0.5).
Mask R-CNN, He et al. 2017 (arXiv:1703.06870) Sec. 3: RoIAlign (Fig. 3; roi_align.py, re-exported here), the mask
branch (masks.py) and L_mask; Sec. 3.1 "Inference": per-class NMS of the detections.
Rethinking ImageNet Pre-training (arXiv:1811.08883) Sec. 4: the box head is "4conv1fc" with GN (Wu & He 2018).
Sampling, losses and post-processing follow torchvision's RoIHeads, the reference of tests/test_roi_heads.py.

Shapes: N images, C channels, R RoIs, S pooled side (7 box, 14 mask), K classes incl. background, G ground-truth
boxes, P positive RoIs, D detections.
"""
import torch
import torch.nn.functional as F
from torch import nn

from boxes import BalancedSampler, BoxCoder, Matcher, batched_nms, big_enough, box_iou, clip_boxes, image_limits
from distributed import loss_denominator
from masks import MaskHead, mask_loss, paste_masks
from norm import make_norm
from roi_align import map_levels, mask_targets, multilevel_roi_align, roi_align

__all__ = ["roi_align", "map_levels", "multilevel_roi_align", "mask_targets", "BoxHead", "BoxPredictor", "MaskHead",
           "RoIHeads", "fast_rcnn_loss", "paste_masks"]

BACKGROUND = 0  # class 0 (Fast R-CNN Sec. 2: "K object classes plus a catch-all background class")


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
    """Sample RoIs, pool them, run the box head (and mask, keypoint heads); losses in training, detections in eval."""

    def __init__(self, box_head, box_predictor, mask_head=None, fg_iou=0.5, bg_iou=0.5, batch_size_per_image=512,
                 positive_fraction=0.25, bbox_reg_weights=(10.0, 10.0, 5.0, 5.0), score_thresh=0.05, nms_thresh=0.5,
                 detections_per_img=100, box_resolution=7, mask_resolution=14, sampling_ratio=2, aligned=False,
                 box_loss_beta=1.0, keypoint_head=None):
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
        self.box_loss_beta = box_loss_beta  # smooth-L1 beta of L_loc (fast_rcnn_loss)
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
        image = torch.empty(boxes.shape[0], dtype=torch.int64, device=boxes.device)  # (R,) image of each RoI
        for i, img in enumerate(image.split(per_image)):
            img.fill_(i)  # fills, not a host-to-device copy
        limits = image_limits(image_sizes, boxes)[image, None]  # (R, 1, 4) each RoI's image bounds
        b = clip_boxes(boxes[:, 1:], limits)  # (R, K-1, 4): background dropped
        s = scores[:, 1:]  # (R, K-1)
        # scores > score_thresh, and boxes of at least 0.01 pixel (torchvision's remove_small_boxes)
        candidate = (s > self.score_thresh) & big_enough(b, 1e-2)
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
            loss_cls, loss_box = fast_rcnn_loss(class_logits, box_deltas, labels, regression_targets,
                                                self.box_loss_beta)
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
