"""Keypoint R-CNN: the keypoint branch of Mask R-CNN, for the paper's human-keypoint experiment (Rethinking Fig. 6).

Mask R-CNN, He et al. 2017 (arXiv:1703.06870) Sec. 5 "Mask R-CNN for Human Pose Estimation": each of the K keypoints
is a one-hot m x m mask in which only the keypoint's pixel is foreground. The head is "a stack of eight 3x3 512-d
conv layers, followed by a deconv layer and 2x bilinear upscaling, producing an output resolution of 56x56", on
14x14 RoIAlign features. Training minimizes, for each visible ground-truth keypoint, "the cross-entropy loss over an
m^2-way softmax output". Departure, as Detectron and torchvision: targets and loss cover every labelled keypoint
(v > 0, so hidden ones with v = 1 too), not only the visible (v = 2) ones.
Rethinking ImageNet Pre-training (arXiv:1811.08883) Fig. 6 trains this model (R50-FPN, GN) from scratch: 65.6
keypoint AP at 2x, against 65.5 with ImageNet pre-training.
Targets, loss and decoding follow Detectron and torchvision (keypoints_to_heatmap, keypointrcnn_loss,
heatmaps_to_keypoints), the reference of tests/test_keypoints.py. The branch has the mask branch's shape (masks.py):
RoIHeads hands it the positive RoIs in training (loss) and the detections at test (predict).

Shapes: R RoIs, C channels, S pooled side (14), M heatmap side (56), K keypoints, G ground-truth people,
P positive RoIs, D detections; a keypoint is (x, y, v) in image pixels, v = 0 not labelled, 1 hidden, 2 visible
(COCO), and a prediction is (x, y, 1) with a score.
"""
import torch
import torch.nn.functional as F
from torch import nn

import fast_ops
from backbone import msra_init_
from distributed import loss_denominator
from norm import head_convs
from roi_align import multilevel_roi_align


class KeypointHead(nn.Module):
    """(R, C, 14, 14) RoI features -> (R, K, 56, 56) keypoint logits; also the branch's training and test steps.

    Mask R-CNN Sec. 5: num_convs x (3x3 conv conv_dim + norm + ReLU), a 4x4 stride-2 deconv to K maps (28x28),
    2x bilinear upsampling (56x56). norm="none" is torchvision's KeypointRCNNHeads + KeypointRCNNPredictor exactly
    (convs.i.0 = its i-th conv, deconv = its kps_score_lowres). The r50_fpn_gn_kp preset puts GN after every conv:
    this code's reading of Fig. 6's "R50-FPN + GN", as in the box and mask heads (Detectron's head has no norm).
    resolution, sampling_ratio, aligned: its multi-level RoIAlign (14 x 14, 2 points per bin, Detectron's RoIAlign).
    """

    plain_ops = False  # True (build_model(plain_ops=True)): roi_align.py's plain RoIAlign

    def __init__(self, in_channels=256, num_keypoints=17, num_convs=8, conv_dim=512, norm="gn", num_groups=32,
                 resolution=14, sampling_ratio=2, aligned=False):
        super().__init__()
        self.convs = head_convs(in_channels, num_convs, conv_dim, norm, num_groups)
        channels = conv_dim if num_convs else in_channels
        # kernel 4, stride 2, padding 1: exactly doubles the side (14 -> 28), as Detectron's KRCNN deconv
        self.deconv = nn.ConvTranspose2d(channels, num_keypoints, kernel_size=4, stride=2, padding=1)
        msra_init_(self)  # MSRAFill in Detectron's keypoint configs; torchvision
        self.num_keypoints = num_keypoints
        self.resolution, self.sampling_ratio, self.aligned = resolution, sampling_ratio, aligned

    def forward(self, x):
        """x (R, C, S, S) -> (R, K, 4S, 4S): deconv x2, then bilinear x2 (Mask R-CNN Sec. 5).
        Detectron upsamples with a fixed bilinear deconv (zeros beyond the border); F.interpolate as torchvision."""
        return F.interpolate(self.deconv(self.convs(x)), scale_factor=2.0, mode="bilinear", align_corners=False)

    def logits(self, features, boxes, image_shape):
        """Boxes [(R_i, 4)] on features [P2..P5] of a padded batch of size image_shape -> (R, K, M, M) logits,
        each box pooled 14 x 14 from its FPN level (Eq. 1)."""
        pool = multilevel_roi_align if self.plain_ops else fast_ops.multilevel_roi_align
        return self(pool(features, boxes, image_shape, self.resolution, self.sampling_ratio, self.aligned))

    def loss(self, features, rois, labels, matched, targets, image_shape):
        """Training step (Mask R-CNN Sec. 5, defined on positive RoIs as L_mask in Sec. 3): rois [(P_i, 4)] the
        POSITIVE sampled RoIs of each image, labels (P,) their classes (unused: one keypoint set, "person"),
        matched [(P_i,)] their GT index into targets [{"keypoints" (G, K, 3)}]. Returns {"loss_keypoint": loss}."""
        if any("keypoints" not in t for t in targets):
            raise ValueError("the keypoint head needs targets with 'keypoints' (G, K, 3): train on a COCO "
                             "person-keypoints json, or build the model with num_keypoints=0")
        logits = self.logits(features, rois, image_shape)  # (P, K, M, M)
        index, valid = zip(*[keypoint_targets(t["keypoints"][m], r, logits.shape[-1])
                             for t, r, m in zip(targets, rois, matched)])  # [(P_i, K)] each
        return {"loss_keypoint": keypoint_loss(logits, torch.cat(index), torch.cat(valid))}

    def predict(self, features, detections, image_shape):
        """Test step (Mask R-CNN Sec. 5, as for masks in Sec. 3.1): the branch runs on the final detections.
        Adds "keypoints" (D_i, K, 3) as (x, y, 1) and "keypoint_scores" (D_i, K) to each detection dict."""
        boxes = [d["boxes"] for d in detections]
        logits = self.logits(features, boxes, image_shape)  # (D, K, M, M)
        for d, maps, b in zip(detections, logits.split([b.shape[0] for b in boxes]), boxes):
            d["keypoints"], d["keypoint_scores"] = heatmaps_to_keypoints(maps, b)


def keypoint_targets(keypoints, rois, M):
    """Mask R-CNN Sec. 5: each RoI's keypoint k is one pixel of an M x M grid laid over the RoI.

    keypoints (P, K, 3) of each RoI's matched person, rois (P, 4) -> index (P, K) int64, the target pixel
    y * M + x (0 where invalid), and valid (P, K) bool: labelled (v > 0) and inside the RoI. Equals torchvision's
    keypoints_to_heatmap (and Detectron's keypoints_to_heatmap_labels).
    """
    x1, y1, x2, y2 = (c[:, None] for c in rois.unbind(dim=1))  # (P, 1) each
    x, y = keypoints[..., 0], keypoints[..., 1]  # (P, K)
    # continuous -> discrete: floor((x - x1) * M / w) (Heckbert 1990, pixel d covers [d, d + 1))
    gx = ((x - x1) * (M / (x2 - x1))).floor().long()
    gy = ((y - y1) * (M / (y2 - y1))).floor().long()
    # a keypoint exactly on the right or bottom border would land on pixel M: Detectron puts it on M - 1
    gx = torch.where(x == x2, M - 1, gx)
    gy = torch.where(y == y2, M - 1, gy)
    valid = (gx >= 0) & (gy >= 0) & (gx < M) & (gy < M) & (keypoints[..., 2] > 0)  # outside the RoI: no target
    return torch.where(valid, gy * M + gx, 0), valid


def keypoint_loss(logits, index, valid):
    """Mask R-CNN Sec. 5: per labelled keypoint (v > 0, the departure noted at the top of this file), cross-entropy
    of an M^2-way softmax over the heatmap.

    logits (P, K, M, M), index (P, K) target pixels, valid (P, K). Averaged over the valid keypoints of the whole
    batch (torchvision; Detectron's KRCNN.NORMALIZE_BY_VISIBLE_KEYPOINTS); with several processes, of the joint
    batch (distributed.loss_denominator).
    """
    P, K, M, _ = logits.shape
    n_valid = loss_denominator(int(valid.sum()), device=logits.device)  # a collective: every process calls it
    if not valid.any():
        return logits.sum() * 0  # no valid keypoint in any positive RoI: a zero that reaches every parameter
    flat = logits.reshape(P * K, M * M)  # (P*K, M*M): one M^2-way classification per (RoI, keypoint)
    keep = valid.reshape(-1)  # (P, K) -> (P*K,), in flat's row order
    return F.cross_entropy(flat[keep], index.reshape(-1)[keep], reduction="sum") / n_valid  # index (P, K) -> (P*K,)


def heatmaps_to_keypoints(maps, rois):
    """Mask R-CNN Sec. 5 inference: each heatmap's arg-max, mapped back into the image -> keypoints, scores.

    maps (D, K, M, M) logits, rois (D, 4) -> keypoints (D, K, 3) as (x, y, 1) and scores (D, K), the logit at the
    maximum. As Detectron and torchvision's heatmaps_to_keypoints: each map is first resized (bicubic) to the
    RoI's size in pixels, so the arg-max is found at the image's resolution, not on the coarse 56x56 grid.
    Loops over detections: each has its own size, and a padded (D, K, H, W) batch would need too much memory.
    """
    D, K = maps.shape[:2]
    maps = maps.float()
    x1, y1 = rois[:, 0], rois[:, 1]
    widths = (rois[:, 2] - rois[:, 0]).clamp(min=1)  # (D,)
    heights = (rois[:, 3] - rois[:, 1]).clamp(min=1)
    keypoints = maps.new_ones((D, K, 3))
    scores = maps.new_zeros((D, K))
    for i in range(D):
        h, w = int(heights[i].ceil()), int(widths[i].ceil())  # the RoI's size, rounded up to whole pixels
        roi_map = F.interpolate(maps[i][:, None], size=(h, w), mode="bicubic", align_corners=False)[:, 0]  # (K, h, w)
        pos = roi_map.reshape(K, h * w).argmax(dim=1)  # (K,)
        px, py = pos % w, torch.div(pos, w, rounding_mode="floor")
        # discrete -> continuous: pixel d is centred at d + 0.5 (Heckbert 1990), scaled back from ceil(w) to w
        keypoints[i, :, 0] = (px.float() + 0.5) * (widths[i] / w) + x1[i]
        keypoints[i, :, 1] = (py.float() + 0.5) * (heights[i] / h) + y1[i]
        scores[i] = roi_map[torch.arange(K, device=maps.device), py, px]
    return keypoints, scores
