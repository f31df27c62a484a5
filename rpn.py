"""Region Proposal Network on a feature pyramid.

Faster R-CNN, Ren et al. 2015 (arXiv:1506.01497), Sec. 3.1: a 3x3 conv slides over the feature map and two sibling
1x1 convs predict, for k anchors per location, an objectness score and 4 box deltas (Sec. 3.1.1); anchor labels and
the loss of Eq. (1) (Sec. 3.1.2); 256 sampled anchors per image, N(0, 0.01) init (Sec. 3.1.3); NMS at IoU 0.7
(Sec. 3.3).
FPN, Lin et al. 2017 (arXiv:1612.03144), Sec. 4.1: the same head, shared, on every level P2..P6, with one anchor
size per level {32, 64, 128, 256, 512} and aspect ratios {1:2, 1:1, 2:1}, so 15 anchors over the pyramid.
Without FPN (Faster R-CNN Sec. 3.1.1) there is one level (conv5_3 of VGG-16, stride 16) with several sizes on it:
3 scales {128, 256, 512} x 3 aspect ratios = 9 anchors per location, written anchor_sizes=((128, 256, 512),).
The numerics follow torchvision's RegionProposalNetwork (our tests compare against it).

Shapes: N images, L pyramid levels, A anchors/location, H,W size of one level, T = sum over levels of H*W*A
(all anchors of one image), G ground-truth boxes of one image, R proposals of one image.
"""
import torch
import torch.nn.functional as F
from torch import nn

import fast_ops
from boxes import (IGNORE, NEGATIVE, POSITIVE, BalancedSampler, BoxCoder, Matcher, batched_nms, big_enough, box_iou,
                   clip_boxes)
from distributed import loss_denominator


def cell_anchors(sizes, aspect_ratios):
    """The A = len(aspect_ratios) * len(sizes) anchors of one location, centred on (0, 0) -> (A, 4), ratio-major as
    torchvision and py-faster-rcnn (all sizes of the first ratio, then the next ratio): area size**2, h / w = ratio,
    corners rounded to integers as torchvision (Faster R-CNN Sec. 3.1.1)."""
    ratios = torch.as_tensor(aspect_ratios, dtype=torch.float32)
    h_ratios = torch.sqrt(ratios)
    w_ratios = 1 / h_ratios
    scales = torch.as_tensor(sizes, dtype=torch.float32)
    ws = (w_ratios[:, None] * scales[None, :]).reshape(-1)  # (ratios, sizes) -> (A,)
    hs = (h_ratios[:, None] * scales[None, :]).reshape(-1)
    return (torch.stack((-ws, -hs, ws, hs), dim=1) / 2).round()  # (A, 4)


class AnchorGenerator(nn.Module):
    """Anchors of several aspect ratios (h / w) at every location of every level.

    sizes has one entry per level: a size (FPN Sec. 4.1, one size per level) or a tuple of sizes (Faster R-CNN
    Sec. 3.1.1, several scales on one map). Every level must have the same number of sizes: the head is shared.
    """

    def __init__(self, sizes=(32, 64, 128, 256, 512), aspect_ratios=(0.5, 1.0, 2.0)):
        super().__init__()
        self.sizes = [tuple(s) if isinstance(s, (tuple, list)) else (s,) for s in sizes]  # L x (sizes of the level)
        assert len({len(s) for s in self.sizes}) == 1, f"every level needs as many anchor sizes; got {sizes}"
        self.aspect_ratios = aspect_ratios
        self.cell_anchors = [cell_anchors(s, aspect_ratios) for s in self.sizes]  # L x (A, 4), no parameters

    def num_anchors_per_location(self):
        return len(self.aspect_ratios) * len(self.sizes[0])

    def forward(self, image_shape, feature_shapes, device, dtype):
        """image_shape (H, W) of the padded batch, feature_shapes [(h, w)] per level -> L x (h*w*A, 4) anchors."""
        assert len(feature_shapes) == len(self.sizes), f"{len(self.sizes)} sizes but {len(feature_shapes)} levels"
        anchors = []
        for (h, w), cell in zip(feature_shapes, self.cell_anchors):
            # The stride as torchvision takes it, image size // map size: P2..P5 get 4..32 exactly (the batch is
            # padded to multiples of 32), P6 a little less than 64 when H / 32 is odd (800 px: 800 // 13 = 61).
            # Departure: Detectron and Detectron2 place P6's anchors 64 px apart whatever the size.
            stride_y, stride_x = image_shape[0] // h, image_shape[1] // w
            shift_x = torch.arange(w, device=device, dtype=dtype) * stride_x  # (w,) top-left corner of each cell
            shift_y = torch.arange(h, device=device, dtype=dtype) * stride_y  # (h,)
            shift_y, shift_x = torch.meshgrid(shift_y, shift_x, indexing="ij")  # (h, w) each
            shifts = torch.stack((shift_x, shift_y, shift_x, shift_y), dim=-1).reshape(-1, 1, 4)  # (h*w, 1, 4)
            cell = cell.to(device=device, dtype=dtype).reshape(1, -1, 4)  # (1, A, 4)
            anchors.append((shifts + cell).reshape(-1, 4))  # (h*w, A, 4) -> (h*w*A, 4): location-major, anchor-minor
        return anchors


class RPNHead(nn.Module):
    """Faster R-CNN Sec. 3.1: 3x3 conv + ReLU, then sibling 1x1 convs for objectness (A) and box deltas (4A).

    One sigmoid logit per anchor: the paper's cls layer is a 2-way softmax (2k outputs) but it notes that logistic
    regression with k scores is an alternative; Detectron and torchvision use the k-logit version.
    """

    def __init__(self, in_channels=256, num_anchors=3):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, in_channels, kernel_size=3, padding=1)
        self.cls_logits = nn.Conv2d(in_channels, num_anchors, kernel_size=1)
        self.bbox_pred = nn.Conv2d(in_channels, num_anchors * 4, kernel_size=1)
        for conv in (self.conv, self.cls_logits, self.bbox_pred):
            nn.init.normal_(conv.weight, std=0.01)  # Faster R-CNN Sec. 3.1.3: zero-mean Gaussian, std 0.01
            nn.init.constant_(conv.bias, 0)

    def forward(self, features):
        """features L x (N, C, H, W) -> (L x (N, A, H, W) objectness logits, L x (N, 4A, H, W) box deltas)."""
        pred_objectness, pred_deltas = [], []
        for feature in features:  # the same weights on every level (FPN Sec. 4.1)
            t = F.relu(self.conv(feature))
            pred_objectness.append(self.cls_logits(t))
            pred_deltas.append(self.bbox_pred(t))
        return pred_objectness, pred_deltas


def flatten_predictions(pred_objectness, pred_deltas):
    """Per-level head outputs -> (N, T) logits and (N, T, 4) deltas, in the anchor order of AnchorGenerator."""
    flat_objectness, flat_deltas = [], []
    for objectness, deltas in zip(pred_objectness, pred_deltas):
        n, a, h, w = objectness.shape
        flat_objectness.append(objectness.permute(0, 2, 3, 1).reshape(n, -1))  # (N, A, H, W) -> (N, H*W*A)
        deltas = deltas.view(n, a, 4, h, w)  # (N, A*4, H, W) -> (N, A, 4, H, W)
        deltas = deltas.permute(0, 3, 4, 1, 2)  # (N, H, W, A, 4)
        flat_deltas.append(deltas.reshape(n, -1, 4))  # (N, H*W*A, 4)
    return torch.cat(flat_objectness, dim=1), torch.cat(flat_deltas, dim=1)  # (N, T), (N, T, 4)


class RPN(nn.Module):
    """Anchors + head -> proposals per image (and, when training with targets, loss_rpn_cls and loss_rpn_box).
    plain_ops: select proposals with the per-image loop of select_proposals instead of fast_ops.select_proposals."""

    plain_ops = False

    def __init__(self, in_channels=256, anchor_sizes=(32, 64, 128, 256, 512), aspect_ratios=(0.5, 1.0, 2.0),
                 fg_iou=0.7, bg_iou=0.3, batch_size_per_image=256, positive_fraction=0.5,
                 pre_nms_top_n_train=2000, post_nms_top_n_train=1000, pre_nms_top_n_test=1000,
                 post_nms_top_n_test=1000, nms_thresh=0.7, min_size=1e-3, score_thresh=0.0):
        super().__init__()
        self.anchor_generator = AnchorGenerator(anchor_sizes, aspect_ratios)
        self.head = RPNHead(in_channels, self.anchor_generator.num_anchors_per_location())
        self.box_coder = BoxCoder(weights=(1.0, 1.0, 1.0, 1.0))
        # Sec. 3.1.2: positive if IoU >= 0.7 or the best anchor of a gt box (low-quality match), negative if < 0.3.
        self.matcher = Matcher(fg_iou, bg_iou, allow_low_quality_matches=True)
        self.sampler = BalancedSampler(batch_size_per_image, positive_fraction)  # Sec. 3.1.3: 256 anchors, up to 1:1
        # Pre-NMS top-n is per level and per image, as in Detectron and torchvision (the papers do not specify it).
        self.pre_nms_top_n = {"train": pre_nms_top_n_train, "test": pre_nms_top_n_test}
        # Post-NMS top-n is per image. Training keeps 1000 per image as Detectron2 does: Detectron (used by the paper)
        # keeps 2000 per batch of 2 images, i.e. ~1000 per image; torchvision keeps 2000 per image.
        self.post_nms_top_n = {"train": post_nms_top_n_train, "test": post_nms_top_n_test}
        self.nms_thresh = nms_thresh  # Faster R-CNN Sec. 3.3: NMS at IoU 0.7
        self.min_size = min_size
        self.score_thresh = score_thresh

    def forward(self, features, image_shape, image_sizes, targets=None):
        """features L x (N, C, H, W), image_shape (H, W) of the padded batch, image_sizes N x (h, w) of the real images.

        Returns (proposals N x (R, 4) detached, losses dict).
        """
        assert len(features) == len(self.anchor_generator.sizes), (
            f"expected {len(self.anchor_generator.sizes)} pyramid levels, got {len(features)}")
        pred_objectness, pred_deltas = self.head(features)
        # Boxes are float32 at least: under bf16 autocast the maps are bf16, whose 8-bit mantissa would put
        # coordinates beyond 1024 pixels on a grid of 8 (torchvision keeps the maps' dtype; Detectron2 float32).
        anchors = self.anchor_generator(image_shape, [f.shape[-2:] for f in features], features[0].device,
                                        torch.promote_types(features[0].dtype, torch.float32))  # L x (H*W*A, 4)
        num_anchors_per_level = [a.shape[0] for a in anchors]
        anchors = torch.cat(anchors, dim=0)  # (T, 4), the same for every image
        pred_objectness, pred_deltas = flatten_predictions(pred_objectness, pred_deltas)  # (N, T), (N, T, 4)
        n = pred_objectness.shape[0]

        # Faster R-CNN Sec. 3.2 ("approximate joint training"): no gradient flows through the proposal coordinates.
        proposals = self.box_coder.decode(pred_deltas.detach().reshape(-1, 4), anchors.repeat(n, 1))  # (N*T, 4)
        proposals = self.select_proposals(proposals.view(n, -1, 4), pred_objectness.detach(), image_sizes,  # (N, T, 4)
                                          num_anchors_per_level)

        losses = {}
        if self.training and targets is not None:
            losses = self.losses(anchors, pred_objectness, pred_deltas, targets)
        return proposals, losses

    def select_proposals(self, proposals, objectness, image_sizes, num_anchors_per_level):
        """proposals (N, T, 4), objectness logits (N, T) -> N x (R, 4) proposals by decreasing score.

        Per image (Faster R-CNN Sec. 3.3, per FPN level as in Detectron and torchvision): the pre_nms_top_n anchors
        of each level with the highest objectness, their boxes clipped to the image, boxes under min_size dropped,
        NMS at IoU 0.7 within each level, then the post_nms_top_n best of all levels. fast_ops.select_proposals does
        all images and levels at once; this loop runs with plain_ops.
        Departure: exactly tied scores keep their level-then-top-k order (our sorts are stable); torchvision's sort is
        not stable, so its tied proposals may come in another order (tests/test_gn_twin.py compares them as sets).
        """
        mode = "train" if self.training else "test"
        pre_nms_top_n, post_nms_top_n = self.pre_nms_top_n[mode], self.post_nms_top_n[mode]
        if not self.plain_ops:
            return fast_ops.select_proposals(proposals, objectness, image_sizes, num_anchors_per_level, pre_nms_top_n,
                                             post_nms_top_n, self.nms_thresh, self.min_size, self.score_thresh)
        selected = []
        for boxes, logits, image_size in zip(proposals, objectness, image_sizes):  # (T, 4), (T,) of one image
            top, level = [], []
            for k, level_logits in enumerate(logits.split(num_anchors_per_level)):  # top-n of each level
                start = sum(num_anchors_per_level[:k])
                top.append(level_logits.topk(min(pre_nms_top_n, level_logits.numel())).indices + start)
                level.append(torch.full_like(top[-1], k))
            top, level = torch.cat(top), torch.cat(level)
            boxes, scores = clip_boxes(boxes[top], image_size), torch.sigmoid(logits[top])
            keep = torch.where(big_enough(boxes, self.min_size) & (scores >= self.score_thresh))[0]
            keep = keep[batched_nms(boxes[keep], scores[keep], level[keep], self.nms_thresh)]  # NMS per level
            selected.append(boxes[keep[:post_nms_top_n]])
        return selected

    def label_anchors(self, anchors, gt_boxes):
        """anchors (T, 4), gt_boxes (G, 4) -> labels (T,) in {1, 0, -1}, matched gt box (T, 4) for every anchor.

        Departure from Faster R-CNN Sec. 3.3, which ignores anchors crossing the image border during training: as in
        torchvision (and Detectron2), every anchor is labelled, also those over the padding.
        """
        if gt_boxes.numel() == 0:  # an image without objects: every anchor is a negative
            return (torch.full((anchors.shape[0],), NEGATIVE, dtype=torch.float32, device=anchors.device),
                    torch.zeros_like(anchors))
        matched = self.matcher(box_iou(gt_boxes, anchors))  # (T,)
        labels = torch.where(matched == Matcher.BELOW_LOW_THRESHOLD, NEGATIVE, POSITIVE)  # no boolean indexing
        labels = torch.where(matched == Matcher.BETWEEN_THRESHOLDS, IGNORE, labels).to(torch.float32)  # (T,)
        return labels, gt_boxes[matched.clamp(min=0)]

    def losses(self, anchors, pred_objectness, pred_deltas, targets):
        """Per image: label the anchors (Sec. 3.1.2), sample 256 of them (Sec. 3.1.3), encode the positives' targets
        (Eq. 2); then the loss of Eq. (1) over the batch (rpn_loss)."""
        num_anchors = anchors.shape[0]
        labels, pos_idx, neg_idx, gt_deltas = [], [], [], []
        for i, target in enumerate(targets):  # loop over images: match, sample, encode
            labels_i, matched_gt_i = self.label_anchors(anchors, target["boxes"])
            pos, neg = self.sampler(labels_i)
            gt_deltas.append(self.box_coder.encode(matched_gt_i[pos], anchors[pos]))  # Eq. (2) targets t*
            labels.append(labels_i)
            pos_idx.append(pos + i * num_anchors)  # indices into the (N*T) flattening
            neg_idx.append(neg + i * num_anchors)
        # the images' anchors in one row: objectness (N, T) -> (N*T,), deltas (N, T, 4) -> (N*T, 4)
        loss_rpn_cls, loss_rpn_box = rpn_loss(pred_objectness.reshape(-1), pred_deltas.reshape(-1, 4),
                                              torch.cat(labels), torch.cat(pos_idx), torch.cat(neg_idx),
                                              torch.cat(gt_deltas))
        return {"loss_rpn_cls": loss_rpn_cls, "loss_rpn_box": loss_rpn_box}


def rpn_loss(objectness, deltas, labels, pos_idx, neg_idx, gt_deltas, beta=1 / 9):
    """Faster R-CNN Eq. (1) over the sampled anchors, normalised as in Detectron and torchvision (see below).

    objectness (P,) logits and deltas (P, 4) of all anchors of the batch, labels (P,) in {1, 0, -1}, pos_idx and
    neg_idx the sampled positive and negative anchors (indices into P), gt_deltas (len(pos_idx), 4) the Eq. (2)
    targets t* of the positives -> (loss_rpn_cls, loss_rpn_box), two scalars.
    """
    sampled = torch.cat([pos_idx, neg_idx])
    # Departure from Eq. (1), as Detectron and torchvision: instead of 1/N_cls and lambda/N_reg (lambda = 10,
    # N_reg ~ 2400 anchor locations), the classification loss is the mean over sampled anchors and the box loss is
    # summed over positives and divided by the number of sampled anchors, with smooth-L1 beta = 1/9.
    # (With several processes the count is that of the joint batch: see distributed.loss_denominator.)
    n_sampled = loss_denominator(sampled.numel(), device=objectness.device)
    loss_cls = F.binary_cross_entropy_with_logits(objectness[sampled], labels[sampled], reduction="sum") / n_sampled
    loss_box = F.smooth_l1_loss(deltas[pos_idx], gt_deltas, beta=beta, reduction="sum") / n_sampled
    return loss_cls, loss_box
