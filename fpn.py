"""Feature Pyramid Network. Lin et al. 2017, "Feature Pyramid Networks for Object Detection" (arXiv:1612.03144),
Sec. 3 and Fig. 3: a top-down pathway with lateral connections turns the backbone's C2..C5 into P2..P5, all with
d = 256 channels; Sec. 4.1 adds P6, a stride-2 subsampling of P5, for the RPN's largest anchors (512^2).

Rethinking ImageNet Pre-training (arXiv:1811.08883) Sec. 4: the FPN-specific layers are normalized too (GN or
SyncBN after the lateral and the output convs, as in Detectron's GN baselines); the original FPN has no
normalization (norm="none", the conv then has a bias, matching torchvision's FeaturePyramidNetwork).

Shapes: N images, d = out_channels; P_k is (N, d, H/2^k, W/2^k) for k = 2..6 (H, W the padded image size).
"""
import torch.nn as nn
import torch.nn.functional as F

from norm import conv2d, make_norm


def _conv_norm(in_channels, out_channels, kernel_size, norm, num_groups):
    """conv (bias only without a norm) [+ norm], as Sequential so the conv is always `.0` (torchvision's keys)."""
    conv = conv2d(in_channels, out_channels, kernel_size, norm, padding=kernel_size // 2)
    # Caffe2's XavierFill (Detectron), Detectron2's c2_xavier_fill, torchvision's FPN: kaiming_uniform_(a=1), i.e.
    # U(+-sqrt(3 / fan_in)).
    nn.init.kaiming_uniform_(conv.weight, a=1)
    if conv.bias is not None:
        nn.init.zeros_(conv.bias)
    layers = [conv] if norm == "none" else [conv, make_norm(norm, out_channels, num_groups)]
    return nn.Sequential(*layers)


class FPN(nn.Module):
    """forward({"C2": .., "C3": .., "C4": .., "C5": ..}) -> {"P2": .., "P3": .., "P4": .., "P5": .., "P6": ..}.

    in_channels: channels of C2..C5 (backbone.out_channels). out_channels: d, 256 in FPN Sec. 3.
    norm / num_groups: a make_norm kind for the lateral and output convs ("gn" in the paper, Sec. 4).
    """

    def __init__(self, in_channels=(256, 512, 1024, 2048), out_channels=256, norm="gn", num_groups=32):
        super().__init__()
        self.in_channels, self.out_channels = list(in_channels), out_channels
        # FPN Sec. 3 "Top-down pathway and lateral connections": a 1x1 conv reduces C_k to d channels ...
        self.lateral_convs = nn.ModuleList(_conv_norm(c, out_channels, 1, norm, num_groups) for c in in_channels)
        # ... and a 3x3 conv on each merged map "reduces the aliasing effect of upsampling" and gives P_k.
        self.output_convs = nn.ModuleList(_conv_norm(out_channels, out_channels, 3, norm, num_groups)
                                          for _ in in_channels)

    def forward(self, features):
        names = [f"C{k}" for k in range(2, 2 + len(self.in_channels))]  # C2..C5
        assert all(n in features for n in names), f"FPN expects {names}, got {list(features)}"
        C = [features[n] for n in names]

        merged = self.lateral_convs[-1](C[-1])  # (N, d, H/32, W/32): the coarsest map starts the top-down path
        P = [self.output_convs[-1](merged)]
        for k in range(len(C) - 2, -1, -1):  # C4, C3, C2
            lateral = self.lateral_convs[k](C[k])  # (N, d, h_k, w_k)
            # FPN Sec. 3: upsample the coarser map by nearest neighbour and add the lateral map element-wise.
            # Upsampling to the lateral's size (not a fixed x2) also handles odd sizes, as torchvision does.
            merged = lateral + F.interpolate(merged, size=lateral.shape[-2:], mode="nearest")
            P.insert(0, self.output_convs[k](merged))
        # FPN Sec. 4.1: "P6 is simply a stride two subsampling of P5" (a 1x1 max pool with stride 2).
        P.append(F.max_pool2d(P[-1], kernel_size=1, stride=2))
        return {f"P{k + 2}": p for k, p in enumerate(P)}  # P2..P6, finest first
