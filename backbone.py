"""Backbones: ResNet / ResNeXt (returning C2..C5) and VGG-16 (returning conv5_3).

- ResNet: He et al. 2016, "Deep Residual Learning for Image Recognition" (arXiv:1512.03385), Sec. 3.3 and Table 1;
  bottleneck blocks: Sec. 4.1, Fig. 5 right. We follow torchvision's "V1.5": the stride-2 sits in the 3x3 conv of a
  block, not in its first 1x1 conv (Detectron's RESNETS.STRIDE_1X1 False, the setting of the paper's scratch configs).
- ResNeXt: Xie et al. 2017, "Aggregated Residual Transformations" (arXiv:1611.05431), Sec. 3.3 and Fig. 3(c): the
  3x3 conv of each bottleneck is a grouped conv with `groups` (cardinality C) groups of `width_per_group` (d)
  channels in the first stage, written "{C}x{d}d". torchvision's resnext101_32x8d is groups=32, width_per_group=8.
- VGG-16: Simonyan & Zisserman 2015 (arXiv:1409.1556), Table 1 column D, as the backbone of Faster R-CNN (conv5_3
  features at stride 16, pool5 dropped).

Rethinking ImageNet Pre-training (He, Girshick & Dollár 2019, arXiv:1811.08883):
- Sec. 3.1 / Sec. 4: normalization in every layer (stem, each bottleneck conv, each shortcut projection), GN or
  SyncBN when training from scratch; nothing frozen (freeze_at=0). FrozenBN and freeze_at=2 are the fine-tuning
  baseline (Detectron's TRAIN.FREEZE_AT 2, torchvision's trainable_backbone_layers=3).
- Sec. 5.1 ("Models without BN/GN - VGG nets"): "MSRA initialization" (He et al. 2015; kaiming_normal_ with
  fan_out, as Caffe2's MSRAFill). The paper names it for VGG only; we use it for all backbones, as Detectron does.
- Table 3: X152 is "ResNeXt-152 8x32d", which in ResNeXt's {C}x{d}d notation (our reading) is
  resnext(depth=152, groups=8, width_per_group=32); Detectron's released X-152 is 32x8d,
  resnext(depth=152, groups=32, width_per_group=8). Both have the same stage widths (256 bottleneck channels in
  res2) and differ only in the grouping of the 3x3 convs.

State-dict keys are torchvision's (conv1, bn1, layer1..layer4, features.N; no fc/classifier), so an ImageNet
checkpoint from torchvision loads with load_state_dict after removing the classifier keys.

Shapes: N images, H, W input size; C2..C5 are (N, c_k, H/2^k, W/2^k), k = 2..5.
"""
import torch.nn as nn

from norm import GroupNorm, SyncBatchNorm, conv2d, make_norm
from related_work import CBAM

RESNET_LAYERS = {50: (3, 4, 6, 3), 101: (3, 4, 23, 3), 152: (3, 8, 36, 3)}  # blocks per stage, ResNet Table 1
VGG16_CONFIG = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512)  # VGG Table 1 D


def _conv(in_channels, out_channels, kernel_size, stride=1, groups=1, norm="gn"):
    """A conv without bias when a normalization layer follows it (its shift makes a bias redundant)."""
    return conv2d(in_channels, out_channels, kernel_size, norm, stride=stride, padding=kernel_size // 2, groups=groups)


def msra_init_(module):
    """MSRA init (He et al. 2015, "Delving Deep into Rectifiers", Eq. 14: std = sqrt(2 / fan_out)) of every conv and
    deconv of module, biases 0; norms 1 / 0. Used by the backbones and the box, mask and keypoint heads."""
    for m in module.modules():
        if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d)):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, (GroupNorm, SyncBatchNorm, nn.BatchNorm2d)) and m.weight is not None:
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


class Bottleneck(nn.Module):
    """ResNet Fig. 5 (right) / ResNeXt Fig. 3(c): 1x1 reduce, 3x3 (grouped, carries the stride), 1x1 expand (x4),
    each followed by a norm, plus the identity or a projection shortcut (ResNet Eq. 2: 1x1 conv + norm).
    attention "cbam" (related work, off by default): related_work.CBAM after the last norm, before the addition."""

    expansion = 4

    def __init__(self, in_channels, planes, stride=1, groups=1, width_per_group=64, norm="gn", num_groups=32,
                 attention=None):
        super().__init__()
        width = int(planes * (width_per_group / 64.0)) * groups  # ResNeXt Table 1: C x d channels in the 3x3 conv
        out_channels = planes * self.expansion
        self.conv1 = _conv(in_channels, width, 1, norm=norm)
        self.bn1 = make_norm(norm, width, num_groups)
        self.conv2 = _conv(width, width, 3, stride=stride, groups=groups, norm=norm)  # V1.5: stride in the 3x3
        self.bn2 = make_norm(norm, width, num_groups)
        self.conv3 = _conv(width, out_channels, 1, norm=norm)
        self.bn3 = make_norm(norm, out_channels, num_groups)
        self.relu = nn.ReLU(inplace=True)
        self.cbam = CBAM(out_channels) if attention == "cbam" else None  # CBAM Fig. 3
        self.downsample = None
        if stride != 1 or in_channels != out_channels:
            # ResNet Eq. 2 / option (B): projection shortcut W_s x when the shape changes; normalized as well
            # (Detectron's basic_gn_shortcut).
            self.downsample = nn.Sequential(_conv(in_channels, out_channels, 1, stride=stride, norm=norm),
                                            make_norm(norm, out_channels, num_groups))

    def forward(self, x):
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        if self.cbam is not None:
            out = self.cbam(out)  # CBAM Fig. 3: F'' = M_s(F') F', F' = M_c(F) F, on the residual branch
        return self.relu(out + identity)  # ResNet Eq. 1: y = F(x) + x, then ReLU


class ResNet(nn.Module):
    """ResNet / ResNeXt trunk returning {"C2": .., "C3": .., "C4": .., "C5": ..} at strides 4, 8, 16, 32.

    layers: bottleneck blocks per stage (ResNet Table 1). groups, width_per_group: ResNeXt cardinality and width
    (1, 64 is plain ResNet). base_planes: bottleneck planes of the first stage, doubled per stage (64 in ResNet;
    smaller only for thin teaching models). norm: a make_norm kind used after every conv. freeze_at: 0 trains
    everything (the paper's scratch setting, Sec. 4); 1 freezes the stem (conv1, bn1); k >= 2 also freezes
    layer1..layer{k-1}. Freezing sets requires_grad=False; a "bn" layer in a frozen stage still updates its running
    statistics in training mode, which is why the fine-tuning baseline pairs freeze_at with norm="frozen_bn".
    attention: None, or "cbam" in every bottleneck (related work, off by default).
    """

    def __init__(self, layers=(3, 4, 6, 3), groups=1, width_per_group=64, stem_channels=64, norm="gn",
                 num_groups=32, freeze_at=0, base_planes=64, attention=None):
        super().__init__()
        # Stem, ResNet Table 1 "conv1": 7x7/2 conv + norm + ReLU, then 3x3/2 max pool -> stride 4.
        self.conv1 = conv2d(3, stem_channels, 7, norm, stride=2, padding=3)
        self.bn1 = make_norm(norm, stem_channels, num_groups)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)

        in_channels, self.out_channels = stem_channels, []
        for i, blocks in enumerate(layers):
            planes = base_planes * 2**i  # 64, 128, 256, 512 in ResNet Table 1
            stride = 1 if i == 0 else 2  # conv2_x keeps stride 4 (after the pool); conv3_x..conv5_x halve
            stage = []
            for b in range(blocks):
                stage.append(Bottleneck(in_channels, planes, stride if b == 0 else 1, groups, width_per_group,
                                        norm, num_groups, attention))
                in_channels = planes * Bottleneck.expansion
            setattr(self, f"layer{i + 1}", nn.Sequential(*stage))
            self.out_channels.append(in_channels)  # e.g. [256, 512, 1024, 2048]

        msra_init_(self)
        self.freeze(freeze_at)

    def freeze(self, freeze_at):
        """requires_grad=False for the first freeze_at stages (stem = stage 1, layer1 = stage 2, ...)."""
        stages = [[self.conv1, self.bn1], [self.layer1], [self.layer2], [self.layer3], [self.layer4]]
        assert 0 <= freeze_at <= len(stages), f"freeze_at must be in 0..{len(stages)}, got {freeze_at}"
        for stage in stages[:freeze_at]:
            for module in stage:
                for p in module.parameters():
                    p.requires_grad_(False)

    def forward(self, x):
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))  # (N, stem, H/4, W/4)
        C2 = self.layer1(x)  # (N, 256, H/4, W/4)
        C3 = self.layer2(C2)  # (N, 512, H/8, W/8)
        C4 = self.layer3(C3)  # (N, 1024, H/16, W/16)
        C5 = self.layer4(C4)  # (N, 2048, H/32, W/32)
        return {"C2": C2, "C3": C3, "C4": C4, "C5": C5}


def resnet50(norm="gn", freeze_at=0, **kw):
    """ResNet-50 (ResNet Table 1), the paper's main backbone (R50)."""
    return ResNet(layers=RESNET_LAYERS[50], norm=norm, freeze_at=freeze_at, **kw)


def resnet101(norm="gn", freeze_at=0, **kw):
    """ResNet-101 (ResNet Table 1), the paper's R101."""
    return ResNet(layers=RESNET_LAYERS[101], norm=norm, freeze_at=freeze_at, **kw)


def resnet152(norm="gn", freeze_at=0, **kw):
    """ResNet-152 (ResNet Table 1)."""
    return ResNet(layers=RESNET_LAYERS[152], norm=norm, freeze_at=freeze_at, **kw)


def resnext(depth=101, groups=32, width_per_group=8, **kw):
    """ResNeXt-{depth} groups x width_per_group d (ResNeXt Table 1 layout; default 101 32x8d as torchvision).

    The paper's X152 (Table 3, "ResNeXt-152 8x32d"): resnext(152, groups=8, width_per_group=32).
    """
    return ResNet(layers=RESNET_LAYERS[depth], groups=groups, width_per_group=width_per_group, **kw)


class VGG16(nn.Module):
    """VGG-16 conv1_1..conv5_3 (+ReLU), the Faster R-CNN backbone of Rethinking Sec. 5.1 ("VGG nets").

    No normalization layers: the paper's point is that even a net without BN/GN trains from scratch (with MSRA
    init). pool5 is dropped, so conv5_3 is at stride 16 (Faster R-CNN Sec. 3.1). Returns {"C5": conv5_3}.
    """

    def __init__(self):
        super().__init__()
        layers, in_channels = [], 3
        for v in VGG16_CONFIG:  # torchvision's layout, so keys are features.0, features.2, ..., features.28
            if v == "M":
                layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
            else:
                layers += [nn.Conv2d(in_channels, v, kernel_size=3, padding=1), nn.ReLU(inplace=True)]
                in_channels = v
        self.features = nn.Sequential(*layers)
        self.out_channels = [in_channels]  # [512]
        msra_init_(self)

    def forward(self, x):
        return {"C5": self.features(x)}  # (N, 512, H/16, W/16)


def vgg16():
    """VGG-16 (VGG Table 1, configuration D) up to conv5_3."""
    return VGG16()
