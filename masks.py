"""The mask branch of Mask R-CNN: head, loss, prediction, and pasting the predicted masks into the image.

Mask R-CNN, He et al. 2017 (arXiv:1703.06870): Sec. 3 "Mask Representation" (a small FCN predicts one m x m mask
per class; L_mask is the average per-pixel binary cross-entropy of the ground-truth class's mask, on positive RoIs
only), Fig. 4 right (FPN mask head: 4 x conv3x3 256, deconv 2x2 stride 2, 1x1 conv to K masks: 14 x 14 -> 28 x 28),
Sec. 3.1 "Inference" (the branch runs on the final detections; the m x m mask is resized to the box in the image).
Rethinking ImageNet Pre-training (arXiv:1811.08883) Sec. 4: GN after every conv of the mask head.
The branch has the keypoint branch's shape (keypoints.py): RoIHeads samples the RoIs, runs the box head and hands
the positive RoIs to MaskHead.loss in training and the detections to MaskHead.predict at test. The mask targets
(the GT masks RoIAligned) are roi_align.mask_targets. The tests compare everything here with torchvision
(MaskRCNNHeads/MaskRCNNPredictor, maskrcnn_loss, paste_masks_in_image).

Shapes: R RoIs, C channels, S pooled side (14), M mask side (28), K classes incl. background, P positive RoIs
(P_i of image i), D detections (D_i of image i), (h, w) image size, T = M + 2 * padding the padded mask side.
"""
import torch
import torch.nn.functional as F
from torch import nn

import fast_ops
from backbone import msra_init_
from distributed import loss_denominator
from norm import head_convs
from roi_align import mask_targets, multilevel_roi_align


class MaskHead(nn.Module):
    """The mask branch: (R, C, 14, 14) RoI features -> (R, K, 28, 28) mask logits (Mask R-CNN Fig. 4 right, GN as
    Rethinking Sec. 4), and its training (loss) and test (predict, probs) steps on RoIs of the FPN features.

    resolution, sampling_ratio, aligned: its multi-level RoIAlign (14 x 14, 2 points per bin, Detectron's RoIAlign).
    """

    plain_ops = False  # True (build_model(plain_ops=True)): roi_align.py's plain RoIAlign and mask targets

    def __init__(self, in_channels=256, num_convs=4, conv_dim=256, norm="gn", num_groups=32, num_classes=81,
                 resolution=14, sampling_ratio=2, aligned=False):
        super().__init__()
        self.convs = head_convs(in_channels, num_convs, conv_dim, norm, num_groups)
        channels = conv_dim if num_convs else in_channels
        self.deconv = nn.ConvTranspose2d(channels, conv_dim, kernel_size=2, stride=2)  # 14 -> 28
        self.mask_logits = nn.Conv2d(conv_dim, num_classes, kernel_size=1)  # one mask per class, no competition
        msra_init_(self)  # all three kinds of conv, biases 0: Detectron's (torchvision's predictor keeps nn.Conv's)
        self.resolution, self.sampling_ratio, self.aligned = resolution, sampling_ratio, aligned

    def forward(self, x):
        """x (R, C, S, S) -> (R, K, 2S, 2S)."""
        return self.mask_logits(F.relu(self.deconv(self.convs(x))))

    def logits(self, features, boxes, image_shape):
        """Boxes [(R_i, 4)] on features [P2..P5] of a padded batch of size image_shape -> (R, K, M, M) logits,
        each box pooled 14 x 14 from its FPN level (Eq. 1)."""
        pool = multilevel_roi_align if self.plain_ops else fast_ops.multilevel_roi_align
        return self(pool(features, boxes, image_shape, self.resolution, self.sampling_ratio, self.aligned))

    def loss(self, features, rois, labels, matched, targets, image_shape):
        """Training step (Mask R-CNN Sec. 3): rois [(P_i, 4)] the POSITIVE sampled RoIs of each image, labels (P,)
        their classes, matched [(P_i,)] their GT index into targets [{"masks" (G, h, w)}].
        Returns {"loss_mask": L_mask}."""
        mask_logits = self.logits(features, rois, image_shape)  # (P, K, M, M)
        cut = mask_targets if self.plain_ops else fast_ops.mask_targets
        gt = [cut(t["masks"], r, m, mask_logits.shape[-1]) for t, r, m in zip(targets, rois, matched)]  # [(P_i, M, M)]
        return {"loss_mask": mask_loss(mask_logits, labels, torch.cat(gt))}

    def probs(self, features, boxes, labels, image_shape):
        """The branch on given boxes [(D_i, 4)] of classes [(D_i,)] -> [(D_i, 1, M, M)] probabilities (also used
        by test-time augmentation, which averages them over views before pasting)."""
        mask_logits = self.logits(features, boxes, image_shape)  # (D, K, M, M)
        label = torch.cat(labels)  # (D,)
        # Mask R-CNN Sec. 3: only the mask of the predicted class k is used, as a per-pixel sigmoid
        probs = mask_logits[torch.arange(label.shape[0], device=label.device), label].sigmoid()  # (D, M, M)
        return list(probs[:, None].split([lab.shape[0] for lab in labels]))  # [(D_i, 1, M, M)]

    def predict(self, features, detections, image_shape):
        """Test step (Mask R-CNN Sec. 3.1 "Inference"): the branch runs on the final detection boxes; adds
        "mask_probs" (D_i, 1, M, M) to each detection dict (MaskRCNN.postprocess pastes them into the image)."""
        probs = self.probs(features, [d["boxes"] for d in detections], [d["labels"] for d in detections],
                           image_shape)
        for d, p in zip(detections, probs):
            d["mask_probs"] = p


def mask_loss(mask_logits, labels, targets):
    """Mask R-CNN Sec. 3: L_mask = mean binary cross-entropy of the sigmoid mask of the RoI's GT class k only.

    mask_logits (R, K, M, M) of the positive RoIs, labels (R,) their GT classes, targets (R, M, M) in [0, 1].
    """
    M = mask_logits.shape[-1]
    # R*M*M here; the joint batch's count with DDP (every process calls it, positives or not: it is a collective)
    n_pixels = loss_denominator(labels.numel() * M * M, device=mask_logits.device)
    if labels.numel() == 0:
        return mask_logits.sum() * 0  # no positive RoI: a zero that still reaches every mask-head parameter
    logits = mask_logits[torch.arange(labels.shape[0], device=labels.device), labels]  # (R, M, M): class k's mask
    return F.binary_cross_entropy_with_logits(logits, targets, reduction="sum") / n_pixels


def paste_masks(mask_probs, boxes, image_size, padding=1):
    """Mask R-CNN Sec. 3.1 "Inference": each M x M soft mask (D, 1, M, M) is resized to its box (D, 4) and placed in
    an image of size (h, w) -> (D, 1, h, w), as torchvision's paste_masks_in_image(..., padding=1).

    The mask gets `padding` pixels of zeros around it and its box grows by the same factor (M + 2 padding) / M, so
    that the mask fades to zero at the box border instead of being cut off; the grown box is truncated to whole
    pixels, covers its last pixel, and is clipped to the image.
    """
    D, _, M, _ = mask_probs.shape
    h, w = image_size
    masks = F.pad(mask_probs[:, 0], (padding,) * 4).float()  # (D, M + 2 padding, M + 2 padding)
    scale = (M + 2 * padding) / M
    pasted = torch.zeros((D, 1, h, w), device=mask_probs.device)
    for d in range(D):  # one detection at a time
        x1, y1, x2, y2 = boxes[d]
        half_w, half_h = (x2 - x1) * 0.5 * scale, (y2 - y1) * 0.5 * scale  # the box grows like the padded mask
        cx, cy = (x2 + x1) * 0.5, (y2 + y1) * 0.5
        x0, x1, y0, y1 = (int(v) for v in (cx - half_w, cx + half_w, cy - half_h, cy + half_h))  # truncated
        box_h, box_w = max(y1 - y0 + 1, 1), max(x1 - x0 + 1, 1)  # pixels y0..y1 and x0..x1, both ends included
        mask = F.interpolate(masks[d][None, None], size=(box_h, box_w), mode="bilinear", align_corners=False)[0, 0]
        top, left, bottom, right = max(y0, 0), max(x0, 0), min(y1 + 1, h), min(x1 + 1, w)  # clipped to the image
        if top < bottom and left < right:
            pasted[d, 0, top:bottom, left:right] = mask[top - y0:bottom - y0, left - x0:right - x0]
    return pasted.to(mask_probs.dtype)
