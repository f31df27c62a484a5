"""Cascade R-CNN: three box stages, each trained at a higher IoU on the boxes the stage before it regressed.

Cai & Vasconcelos, "Cascade R-CNN: Delving into High Quality Object Detection" (CVPR 2018, arXiv:1712.00726):
- Sec. 4.1 "Cascaded Bounding Box Regression": stage t regresses the boxes of stage t - 1, with its own regressor;
  the deltas are normalized per stage because they shrink as the boxes improve. The normalization is written here as
  box coder weights that grow with the stage: (10, 10, 5, 5), (20, 20, 10, 10), (30, 30, 15, 15), Detectron2's
  defaults for its cascade head (ROI_BOX_CASCADE_HEAD), as are the IoU thresholds below.
- Sec. 4.2 "Cascaded Detection": stage t has its own head and classifier and is trained with the IoU threshold
  u_t = 0.5, 0.6, 0.7 on those resampled boxes; the loss is the sum over stages of the Fast R-CNN loss.
Rethinking ImageNet Pre-training (arXiv:1811.08883), Sec. 5 "Enhanced baselines": the cascade adds two stages to
Mask R-CNN, with the mask head on the last stage; the scratch models are trained as Mask R-CNN and switched to the
cascade for the final 270k iterations (train.py --weights, see README).

Where the papers leave details open we follow Detectron2's CascadeROIHeads:
- regression is class-agnostic in every stage (4 deltas per RoI, not 4 per class);
- the losses of the stages are summed and the gradient each stage sends into the shared features is scaled by 1/3
  (Detectron2 notes that the original code averages the stage losses and scales the heads' gradients up instead:
  the same update; mmdetection weights the stages 1, 0.5, 0.25);
- at test, every stage scores the boxes it was given, the class probabilities of the three stages are averaged and
  the boxes are the last stage's; then NMS exactly as RoIHeads.
Departures from Detectron2:
- training: every stage adds the ground-truth boxes to its input and samples 512 RoIs at 25% foreground with its
  own IoU threshold, as mmdetection's Cascade R-CNN does; Detectron2 samples once, before stage 1, and later stages
  label all of the previous stage's boxes (no resampling, no GT added again). mmdetection also drops the sampled
  RoIs that were GT boxes before regressing the rest for the next stage; here they go on, so a later stage can
  sample a GT box twice (itself and its regressed copy);
- the mask head learns from the last stage's positive RoIs (foreground at IoU >= 0.7), the RoIs it sees at test;
  Detectron2 trains it on stage 1's RoIs (foreground at IoU >= 0.5).

Shapes: N images, K classes incl. background, R RoIs over all images (R_i of image i), F box-head features,
D detections of one image.
"""
import torch
import torch.nn.functional as F
from torch import nn

import fast_ops
from boxes import batched_nms, clip_boxes, remove_small_boxes
from roi_align import multilevel_roi_align
from roi_heads import (BoxPredictor, RoIHeads, branch_losses, fast_rcnn_loss, predict_with_branches,
                       select_detections)

STAGE_IOUS = (0.5, 0.6, 0.7)                                                     # Cascade R-CNN Sec. 4.2: u_t
STAGE_BBOX_REG_WEIGHTS = ((10.0, 10.0, 5.0, 5.0), (20.0, 20.0, 10.0, 10.0), (30.0, 30.0, 15.0, 15.0))  # Sec. 4.1


def scale_gradient(x, scale):
    """Identity in the forward pass; multiplies the gradient flowing back through x by scale."""
    if x.requires_grad:
        x.register_hook(lambda grad: grad * scale)
    return x


class CascadeRoIHeads(nn.Module):
    """Drop-in replacement for RoIHeads (the same interface: mask_head, keypoint_head, nms_thresh,
    detections_per_img, detect, forward) with len(box_heads) stages. Each stage is a RoIHeads without branches (its
    own matcher at u_t, sampler, box coder, box head and class-agnostic predictor), so that sampling and losses are
    shared code. The mask head belongs to the cascade itself and runs on the last stage's RoIs and boxes.
    score_thresh, nms_thresh and detections_per_img are the last stage's (the test-time selection is done once)."""

    plain_ops = False  # True (build_model(plain_ops=True)): the plain RoIAlign and NMS of roi_align.py and boxes.py

    def __init__(self, box_heads, num_classes, mask_head=None, stage_ious=STAGE_IOUS,
                 stage_bbox_reg_weights=STAGE_BBOX_REG_WEIGHTS, **roi_heads_kwargs):
        super().__init__()
        assert len(box_heads) == len(stage_ious) == len(stage_bbox_reg_weights), (
            f"{len(box_heads)} box heads, {len(stage_ious)} IoU thresholds, {len(stage_bbox_reg_weights)} coders")
        self.stages = nn.ModuleList(
            RoIHeads(head, BoxPredictor(head.out_channels, num_classes, class_agnostic=True), fg_iou=iou, bg_iou=iou,
                     bbox_reg_weights=weights, **roi_heads_kwargs)
            for head, iou, weights in zip(box_heads, stage_ious, stage_bbox_reg_weights))
        self.mask_head = mask_head  # masks.MaskHead or None
        self.keypoint_head = None  # the cascade predicts boxes and masks (Rethinking Table 3)
        last = self.stages[-1]
        self.score_thresh, self.nms_thresh, self.detections_per_img = (last.score_thresh, last.nms_thresh,
                                                                       last.detections_per_img)

    def run_stage(self, stage, features, rois, image_shape):
        """rois [(R_i, 4)] -> class logits (R, K), class-agnostic box deltas (R, 4)."""
        pool = multilevel_roi_align if self.plain_ops else fast_ops.multilevel_roi_align
        pooled = pool(features, rois, image_shape, stage.box_resolution, stage.sampling_ratio,
                      stage.aligned)  # (R, C, 7, 7)
        pooled = scale_gradient(pooled, 1.0 / len(self.stages))  # Detectron2: the stages share the features
        return stage.box_predictor(stage.box_head(pooled))

    def next_rois(self, stage, box_deltas, rois, image_sizes):
        """Stage t's regressed boxes, detached and clipped, are stage t + 1's RoIs: [(R_i, 4)]."""
        boxes = stage.box_coder.decode(box_deltas.detach(), torch.cat(rois))  # (R, 4): class-agnostic
        boxes = [clip_boxes(b, size) for b, size in zip(boxes.split([r.shape[0] for r in rois]), image_sizes)]
        if self.training:  # empty boxes cannot be matched; at test all are kept so the stages' rows stay aligned
            boxes = [b[remove_small_boxes(b, min_size=1e-3)] for b in boxes]
        return boxes

    def detect(self, features, proposals, image_shape, image_sizes):
        """As RoIHeads.detect: every stage scores the boxes it was given, the stages' class probabilities are
        averaged (Detectron2), the boxes are the last stage's; then NMS as RoIHeads -> [{"boxes", "labels",
        "scores"}] per image."""
        probs, rois = [], proposals
        for k, stage in enumerate(self.stages, start=1):
            class_logits, box_deltas = self.run_stage(stage, features, rois, image_shape)  # (R, K), (R, 4)
            probs.append(F.softmax(class_logits, dim=-1))  # (R, K)
            if k < len(self.stages):  # Cascade R-CNN Sec. 4.1: stage k's boxes are stage k + 1's RoIs
                rois = self.next_rois(stage, box_deltas, rois, image_sizes)
        scores = torch.stack(probs).mean(dim=0)  # (R, K): the stages' classifiers averaged
        boxes = self.stages[-1].box_coder.decode(box_deltas, torch.cat(rois))  # (R, 4): the last stage's boxes
        boxes = boxes[:, None].expand(-1, scores.shape[1], 4)  # (R, K, 4): class-agnostic, one box for every class
        nms = batched_nms if self.plain_ops else fast_ops.batched_nms
        return select_detections(scores, boxes, [r.shape[0] for r in rois], image_sizes, self.score_thresh,
                                 self.nms_thresh, self.detections_per_img, nms)

    def forward(self, features, proposals, image_shape, image_sizes, targets=None):
        """As RoIHeads.forward. Training losses: loss_cls_stage{1,2,3}, loss_box_stage{1,2,3} and loss_mask."""
        if not self.training:
            return predict_with_branches(self, features, proposals, image_shape, image_sizes)
        assert targets is not None, "CascadeRoIHeads needs targets in training"
        losses, rois = {}, proposals
        for k, stage in enumerate(self.stages, start=1):
            # stage k's own GT boxes, matching at u_k and sampling (see the module docstring)
            rois, labels, matched, regression_targets = stage.sample_rois(rois, targets)
            class_logits, box_deltas = self.run_stage(stage, features, rois, image_shape)  # (R, K), (R, 4)
            losses[f"loss_cls_stage{k}"], losses[f"loss_box_stage{k}"] = fast_rcnn_loss(
                class_logits, box_deltas, labels, regression_targets, stage.box_loss_beta)
            if k < len(self.stages):  # Cascade R-CNN Sec. 4.1: stage k's boxes are stage k + 1's RoIs
                rois = self.next_rois(stage, box_deltas, rois, image_sizes)
        # the branches learn from the last stage's positive RoIs (IoU >= 0.7)
        return {**losses, **branch_losses(self, features, rois, labels, matched, targets, image_shape)}


def cascade_state_dict(state_dict):
    """A Mask R-CNN state dict (model.py names) -> a cascade model's names: the box head and box predictor become
    stage 1's; the backbone, FPN, RPN and mask head (roi_heads.mask_head, the cascade's own) keep their names. Keys
    already in cascade form pass unchanged."""
    renames = [("roi_heads.box_head.", "roi_heads.stages.0.box_head."),
               ("roi_heads.box_predictor.", "roi_heads.stages.0.box_predictor.")]
    converted = {}
    for key, value in state_dict.items():
        for old, new in renames:
            if key.startswith(old):
                key = new + key[len(old):]
        converted[key] = value
    return converted
