"""The mask branch of Mask R-CNN: head, loss and pasting the predicted masks into the image.

Mask R-CNN, He et al. 2017 (arXiv:1703.06870): Sec. 3 "Mask Representation" (a small FCN predicts one m x m mask
per class; L_mask is the average per-pixel binary cross-entropy of the ground-truth class's mask), Fig. 4 right (FPN
mask head: 4 x conv3x3 256, deconv 2x2 stride 2, 1x1 conv to K masks: 14 x 14 -> 28 x 28), Sec. 3.1 "Inference"
(the m x m mask is resized to the box in the image).
Rethinking ImageNet Pre-training (arXiv:1811.08883) Sec. 4: GN after every conv of the mask head.
The mask targets (RoIAlign of the GT masks) are roi_align.mask_targets, re-exported by roi_heads.py; the tests
compare everything here with torchvision (MaskRCNNHeads/MaskRCNNPredictor, maskrcnn_loss, paste_masks_in_image).

Shapes: R RoIs, C channels, S pooled side (14), M mask side (28), K classes incl. background,
D detections, (h, w) image size, T = M + 2 * padding the padded mask side (padding 1 by default).
"""
import torch
import torch.nn.functional as F
from torch import nn

from distributed import loss_denominator
from norm import make_norm


def head_convs(in_channels, num_convs, conv_dim, norm="gn", num_groups=32):
    """num_convs x (3x3 conv + norm + ReLU), the trunk of the mask and keypoint heads: (R, C, S, S) -> (R, conv_dim,
    S, S). Names convs.i.0 (conv), convs.i.1 (norm), as torchvision's heads."""
    blocks, channels = [], in_channels
    for _ in range(num_convs):
        conv = nn.Conv2d(channels, conv_dim, 3, padding=1, bias=norm == "none")  # a norm's shift replaces bias
        blocks.append(nn.Sequential(conv, make_norm(norm, conv_dim, num_groups), nn.ReLU(inplace=True)))
        channels = conv_dim
    return nn.Sequential(*blocks)


class MaskHead(nn.Module):
    """(R, C, 14, 14) RoI features -> (R, K, 28, 28) mask logits (Mask R-CNN Fig. 4 right, GN as Rethinking Sec. 4)."""

    def __init__(self, in_channels=256, num_convs=4, conv_dim=256, norm="gn", num_groups=32, num_classes=81):
        super().__init__()
        self.convs = head_convs(in_channels, num_convs, conv_dim, norm, num_groups)
        channels = conv_dim if num_convs else in_channels
        self.deconv = nn.ConvTranspose2d(channels, conv_dim, kernel_size=2, stride=2)  # 14 -> 28
        self.mask_logits = nn.Conv2d(conv_dim, num_classes, kernel_size=1)  # one mask per class, no competition
        for layer in self.modules():  # MSRA init for all three kinds of conv, bias 0 (torchvision MaskRCNNHeads)
            if isinstance(layer, (nn.Conv2d, nn.ConvTranspose2d)):
                nn.init.kaiming_normal_(layer.weight, mode="fan_out", nonlinearity="relu")
                if layer.bias is not None:
                    nn.init.zeros_(layer.bias)

    def forward(self, x):
        """x (R, C, S, S) -> (R, K, 2S, 2S)."""
        return self.mask_logits(F.relu(self.deconv(self.convs(x))))


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


def paste_weights(start, end, T, length):
    """Per box, the (length, T) matrix that resizes T mask pixels onto the integer pixels start..end of an axis.

    start, end (D,) int64. Equals F.interpolate(mode="bilinear", align_corners=False) of the T pixels to
    n = max(end - start + 1, 1) pixels, placed at start; rows outside [start, end] (and the image) are zero.
    """
    pixel = torch.arange(length, device=start.device)  # (length,) image pixel index
    n = (end - start + 1).clamp(min=1)  # (D,) torchvision's TO_REMOVE = 1: the box covers end inclusive
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
    """Paste M x M soft masks (D, 1, M, M) into an image of size (h, w) at their boxes (D, 4) -> (D, 1, h, w).

    Same result as torchvision's paste_masks_in_image(masks, boxes, (h, w), padding=1), without its loop over boxes:
    the mask gets `padding` pixels of zeros around it (1 by default) and the box grows by the same factor
    (M + 2 * padding) / M, so the mask fades to zero at the box border instead of being cut; the box is truncated to
    integers, and bilinear resizing is separable, so each pasted mask is Wy @ mask @ Wx^T with per-box interpolation
    matrices that are zero outside the box.
    """
    D, _, M, _ = mask_probs.shape
    h, w = image_size
    if D == 0:
        return mask_probs.new_zeros((0, 1, h, w))
    masks = F.pad(mask_probs[:, 0], (padding,) * 4).to(torch.float32)  # (D, T, T), T = M + 2 * padding
    T = M + 2 * padding
    scale = T / M
    half_w = (boxes[:, 2] - boxes[:, 0]) * 0.5
    half_h = (boxes[:, 3] - boxes[:, 1]) * 0.5
    center_x = (boxes[:, 2] + boxes[:, 0]) * 0.5
    center_y = (boxes[:, 3] + boxes[:, 1]) * 0.5
    half_w, half_h = half_w * scale, half_h * scale  # the box grows like the padded mask (torchvision expand_boxes)
    x0, x1 = (center_x - half_w).to(torch.int64), (center_x + half_w).to(torch.int64)  # truncation, as torchvision
    y0, y1 = (center_y - half_h).to(torch.int64), (center_y + half_h).to(torch.int64)
    rows = paste_weights(y0, y1, T, h)  # (D, h, T)
    cols = paste_weights(x0, x1, T, w)  # (D, w, T)
    pasted = rows @ masks @ cols.transpose(1, 2)  # (D, h, T) @ (D, T, T) @ (D, T, w) -> (D, h, w)
    return pasted[:, None].to(mask_probs.dtype)  # (D, 1, h, w)
