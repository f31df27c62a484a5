"""Related work on the model side: not the paper's recipe, off by default (train.py's group "related work").

Three ideas, each of another paper, that have been used to help a network trained from scratch (or with small
batches), for a side-by-side comparison with Rethinking ImageNet Pre-training's plain GN recipe:
- Weight Standardization (Qiao et al. 2019, "Micro-Batch Training with Batch-Channel Normalization and Weight
  Standardization", arXiv:1903.10520, Sec. 3; used with GN in BiT, Kolesnikov et al. 2020, arXiv:1912.11370):
  every conv followed by a GroupNorm standardizes its weight per output channel before use.
  train.py --norm gn_ws; norm.conv2d builds WSConv2d where the norm kind is gn_ws.
- CBAM (Woo et al. 2018, "CBAM: Convolutional Block Attention Module", arXiv:1807.06521, Sec. 3, Fig. 2):
  channel attention, then spatial attention, in each ResNet bottleneck after its last norm and before the
  residual addition (CBAM Fig. 3). train.py --attention cbam; backbone.Bottleneck holds it as `cbam`.
- Network slimming (Liu et al. 2017, "Learning Efficient Convolutional Networks through Network Slimming",
  arXiv:1708.06519, Sec. 3.2, Eq. 1): an L1 penalty on the norm layers' per-channel scales gamma drives unneeded
  channels' scales towards 0; a report counts the channels a pruned model could drop. train.py --slim L,
  evaluate.py --slim-report.

Shapes: N images (or RoIs), C channels, H, W spatial size; a conv weight is (C_out, C_in / groups, kh, kw).
"""
import torch
import torch.nn as nn
import torch.nn.functional as F


# ------------------------------------------------------------------------------------------ Weight Standardization

def standardize_weight(weight, eps=1e-5):
    """WS (Qiao et al. 2019, Sec. 3): each output channel's weights, (C_in / groups, kh, kw) of them, to zero mean and
    unit variance: W_hat = (W - mean) / sqrt(var + eps), the biased variance, eps = 1e-5 inside the square root.
    weight (C_out, C_in / groups, kh, kw) -> the same shape. Gradients flow through the mean and the variance."""
    dims = tuple(range(1, weight.dim()))  # one output channel: (C_in / groups, kh, kw)
    mean = weight.mean(dims, keepdim=True)  # (C_out, 1, 1, 1)
    var = weight.var(dims, unbiased=False, keepdim=True)  # (C_out, 1, 1, 1), biased: 1/I sum (W - mean)^2
    return (weight - mean) / torch.sqrt(var + eps)


class WSConv2d(nn.Conv2d):
    """nn.Conv2d whose weight is standardized (standardize_weight) at every forward: the same parameters and names
    (weight, bias) as nn.Conv2d, so state dicts match in names and shapes. What is learnt is W; the conv uses
    W_hat. Followed by a GroupNorm (--norm gn_ws), as WS + GN in Qiao et al. and BiT."""

    def __init__(self, *args, ws_eps=1e-5, **kwargs):
        super().__init__(*args, **kwargs)
        self.ws_eps = ws_eps

    def forward(self, x):
        return self._conv_forward(x, standardize_weight(self.weight, self.ws_eps), self.bias)

    def extra_repr(self):
        return super().extra_repr() + f", ws_eps={self.ws_eps}"


# ---------------------------------------------------------------------------------------------------------- CBAM

class ChannelAttention(nn.Module):
    """CBAM Eq. 2: M_c(F) = sigmoid(MLP(AvgPool(F)) + MLP(MaxPool(F))), one shared MLP C -> C/r -> C with a ReLU
    between (W_0, W_1 of the paper; fc1, fc2 here, with biases as the authors' code). (N, C, H, W) -> (N, C, 1, 1).
    hidden: max(1, C // reduction), so that a thin model (16 channels) keeps at least one hidden unit."""

    def __init__(self, channels, reduction=16):
        super().__init__()
        hidden = max(1, channels // reduction)  # CBAM Sec. 3: C/r hidden units, r = 16 (Sec. 4.1)
        self.fc1 = nn.Linear(channels, hidden)  # W_0
        self.fc2 = nn.Linear(hidden, channels)  # W_1

    def forward(self, x):
        mlp = lambda d: self.fc2(F.relu(self.fc1(d)))  # (N, C) -> (N, C)
        avg, mx = x.mean((2, 3)), x.amax((2, 3))  # (N, C) each: F^c_avg, F^c_max
        return torch.sigmoid(mlp(avg) + mlp(mx))[:, :, None, None]  # Eq. 2, (N, C, 1, 1)


class SpatialAttention(nn.Module):
    """CBAM Eq. 3: M_s(F) = sigmoid(f7x7([AvgPool(F); MaxPool(F)])), the pools over channels.
    (N, C, H, W) -> (N, 1, H, W). f7x7 is one 7x7 conv 2 -> 1 with a bias and no norm, as Eq. 3 (the authors' code
    adds a BatchNorm after it)."""

    def __init__(self, kernel_size=7):
        super().__init__()
        self.conv = nn.Conv2d(2, 1, kernel_size, padding=kernel_size // 2)

    def forward(self, x):
        pooled = torch.cat([x.mean(1, keepdim=True), x.amax(1, keepdim=True)], dim=1)  # (N, 2, H, W)
        return torch.sigmoid(self.conv(pooled))  # Eq. 3, (N, 1, H, W)


class CBAM(nn.Module):
    """CBAM Eq. 1: F' = M_c(F) * F, then F'' = M_s(F') * F' (broadcast products). (N, C, H, W) -> the same.
    Parameters: channel.fc1, channel.fc2, spatial.conv (a checkpoint without them leaves them at their init)."""

    def __init__(self, channels, reduction=16, kernel_size=7):
        super().__init__()
        self.channel = ChannelAttention(channels, reduction)
        self.spatial = SpatialAttention(kernel_size)

    def forward(self, x):
        x = self.channel(x) * x  # Eq. 1, channel attention first (Sec. 4.1: sequential, channel-first is best)
        return self.spatial(x) * x  # Eq. 1, then spatial attention


# ------------------------------------------------------------------------------------------------ Network slimming

def scale_factors(model):
    """The per-channel scales gamma of the norm layers, {name: (C,) parameter}: Liu et al.'s scaling factors
    (Sec. 3.1). A norm layer here is a module whose own `weight` is a one-dimensional parameter: GroupNorm,
    SyncBatchNorm and BatchNorm2d (convs and linears have 4-D and 2-D weights; FrozenBatchNorm2d holds buffers)."""
    return {name: p for name, p in model.named_parameters() if name.rsplit(".", 1)[-1] == "weight" and p.dim() == 1}


def slimming_penalty(model, coefficient):
    """Liu et al. Eq. 1's second term, lambda * sum over gamma of g(gamma), g(s) = |s|: the loss term loss_slim.
    Only trainable scales (a frozen stage's cannot move). Its subgradient is lambda * sign(gamma) (Sec. 3.2).
    The paper's lambda: 1e-4 for VGGNet, 1e-5 for ResNet and DenseNet (also its code's README: -sr --s 0.0001)."""
    scales = [p for p in scale_factors(model).values() if p.requires_grad]
    return coefficient * sum(p.abs().sum() for p in scales)  # Eq. 1: lambda sum_{gamma in Gamma} |gamma|


def slimming_report(model, threshold=1e-2):
    """Network slimming's pruning step (Liu et al. Sec. 3.2, "Channel Pruning"), counted, not done: the channels of
    each norm layer whose |gamma| is below threshold, and the parameters that removing them would save.

    Saved parameters, a lower bound: per pruned channel, its row of the conv that produces it (the last conv
    registered before the norm layer, in this codebase the conv of its conv-norm pair: conv1 / bn1, downsample.0 /
    downsample.1, convs.i.0 / convs.i.1) and the norm's gamma and beta. The layers that read the channel would lose an
    input slice too, and in a ResNet the channels of bn3 and of the shortcut are tied across a stage by the residual
    additions; neither is counted. No FLOPs.
    Returns {"layers": [(name, channels, pruned, saved parameters)], "pruned", "channels", "saved", "total"}.
    """
    scales = {name.rsplit(".", 1)[0]: p for name, p in scale_factors(model).items()}  # module name -> gamma
    layers, conv = [], None
    for name, module in model.named_modules():
        if isinstance(module, nn.Conv2d):
            conv = module
        elif name in scales:
            pruned = int((scales[name].detach().abs() < threshold).sum())
            per_channel = conv.weight[0].numel() + (conv.bias is not None) + 2  # its conv row, bias, gamma and beta
            layers.append((name, scales[name].numel(), pruned, pruned * per_channel))
    return {"layers": layers, "pruned": sum(layer[2] for layer in layers),
            "channels": sum(layer[1] for layer in layers), "saved": sum(layer[3] for layer in layers),
            "total": sum(p.numel() for p in model.parameters())}
