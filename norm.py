"""Normalization layers: the variable that "Rethinking ImageNet Pre-training" studies.

He, Girshick & Dollár 2019 (arXiv:1811.08883), Sec. 3.1 "Normalization": a detector trained from scratch needs
normalization that works at detection batch sizes (2 images per GPU). Frozen BN (the usual fine-tuning choice) has
no statistics to freeze when there is no pre-training, and plain BN with 2 images per GPU has too noisy statistics.
The paper uses one of two remedies everywhere (backbone, FPN and heads, Sec. 4):
  - Group Normalization (Wu & He 2018, arXiv:1803.08494, Sec. 3.1 Eqs. 1-3): statistics over groups of channels
    of one image, independent of the batch size.
  - Synchronized BN (Peng et al. 2018, MegDet): BN whose statistics are computed over the images of all GPUs.
FrozenBatchNorm2d is the pre-training baseline ("BN*"): BN turned into a fixed per-channel affine transform.

Shapes: N images, C channels, G groups, H, W spatial size (any number of trailing spatial dims is allowed).
"""
import math
import warnings

import torch
import torch.distributed as dist
import torch.nn as nn

NORM_KINDS = ("gn", "syncbn", "bn", "frozen_bn", "none")


def _per_channel(t, x):
    """View a per-channel (C,) or per-image-per-channel (N, C) tensor so that it broadcasts against x (N, C, ...)."""
    lead = tuple(t.shape) if t.dim() == 2 else (1, t.shape[0])
    return t.reshape(*lead, *([1] * (x.dim() - 2)))  # (C,) or (N, C) -> (1 or N, C, 1, ..., 1)


class FrozenBatchNorm2d(nn.Module):
    """BatchNorm with fixed statistics and affine: y = x * w / sqrt(rv + eps) + (b - rm * w / sqrt(rv + eps)).

    All four tensors are buffers (nothing is trained), named as in torchvision so that an ImageNet checkpoint loads
    as is; the `num_batches_tracked` key of a BatchNorm state dict is dropped on load.
    """

    def __init__(self, num_features, eps=1e-5):
        super().__init__()
        self.eps = eps
        self.register_buffer("weight", torch.ones(num_features))
        self.register_buffer("bias", torch.zeros(num_features))
        self.register_buffer("running_mean", torch.zeros(num_features))
        self.register_buffer("running_var", torch.ones(num_features))

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        state_dict.pop(prefix + "num_batches_tracked", None)  # a BN counter; meaningless for frozen statistics
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def forward(self, x):
        scale = self.weight * (self.running_var + self.eps).rsqrt()  # (C,) w / sqrt(rv + eps)
        shift = self.bias - self.running_mean * scale  # (C,) b - rm * w / sqrt(rv + eps)
        # Cast to x's dtype so bf16 activations stay bf16 (the float32 buffers would otherwise promote them).
        return torch.addcmul(_per_channel(shift, x).to(x.dtype), x, _per_channel(scale, x).to(x.dtype))

    def extra_repr(self):
        return f"{self.weight.shape[0]}, eps={self.eps}"


class GroupNorm(nn.Module):
    """Group Normalization, Wu & He 2018 (arXiv:1803.08494) Sec. 3.1, written out; equal to torch.nn.GroupNorm.

    The C channels of each image are split into G groups of C/G consecutive channels; each group is normalized by its
    own mean and (biased) variance over its C/G * H * W values, then a per-channel affine (gamma, beta) is applied.
    Statistics are computed in float32 (at least) even for bf16 inputs under autocast; the result is cast back.
    Autograd derives the backward pass. In eager mode this chain of ~15 small ops is slower than torch's fused GN
    kernel; torch.compile fuses it.
    """

    def __init__(self, num_groups, num_channels, eps=1e-5, affine=True):
        super().__init__()
        if num_channels % num_groups != 0:
            raise ValueError(f"GroupNorm: {num_channels} channels do not divide into {num_groups} groups; "
                             f"pass a num_groups that divides {num_channels}")
        self.num_groups, self.num_channels, self.eps, self.affine = num_groups, num_channels, eps, affine
        if affine:
            self.weight = nn.Parameter(torch.ones(num_channels))  # gamma, GN Eq. 3
            self.bias = nn.Parameter(torch.zeros(num_channels))  # beta, GN Eq. 3
        else:
            self.register_parameter("weight", None)
            self.register_parameter("bias", None)

    def forward(self, x):
        N, C, G = x.shape[0], x.shape[1], self.num_groups
        assert C == self.num_channels, f"GroupNorm: expected {self.num_channels} channels, got {C}"
        # Statistics in float32 at least: a no-op for float32, while a bf16 mean would be off by up to 2^-9 of the
        # activation's magnitude, which can be a large fraction of its standard deviation.
        xf = x.to(torch.promote_types(x.dtype, torch.float32))
        xg = xf.reshape(N, G, C // G * math.prod(x.shape[2:]))  # (N, G, C/G*H*W); sizes spelled out for N = 0
        if N == 0:  # an empty batch (e.g. no RoIs): no statistics, but gamma and beta stay in the graph
            var = mean = xg.sum(dim=-1)  # (0, G)
        else:  # GN Eqs. 1-2, S_i = the C/G*H*W values of i's group: mu = mean, sigma^2 = biased variance
            var, mean = torch.var_mean(xg, dim=-1, correction=0)  # (N, G) each
        rstd = torch.rsqrt(var + self.eps).repeat_interleave(C // G, dim=1)  # (N, G) -> (N, C): 1 / sqrt(sigma^2+eps)
        mean = mean.repeat_interleave(C // G, dim=1)  # (N, G) -> (N, C): each channel gets its group's value
        # GN Eq. 3, y = gamma * (x - mu) / sigma + beta, folded into y = x * scale + shift so that the big tensor is
        # read and written once (one addcmul) instead of four times.
        scale = rstd * self.weight if self.affine else rstd  # (N, C)
        shift = self.bias - mean * scale if self.affine else -mean * scale  # (N, C)
        return torch.addcmul(_per_channel(shift, x), xf, _per_channel(scale, x)).to(x.dtype)

    def extra_repr(self):
        return f"{self.num_groups}, {self.num_channels}, eps={self.eps}, affine={self.affine}"


class _AllReduceSum(torch.autograd.Function):
    """Sum a tensor over all processes, with a gradient.

    Every process's loss depends on the summed statistics S = sum_q s_q, so the gradient reaching the local s_q is
    sum_p dL_p/dS: the backward pass is the same all-reduce applied to the incoming gradients.
    """

    @staticmethod
    def forward(ctx, tensor):
        tensor = tensor.clone()
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        return tensor

    @staticmethod
    def backward(ctx, grad):
        grad = grad.clone()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM)
        return grad


class SyncBatchNorm(nn.Module):
    """Batch Normalization whose statistics cover the images of all processes (Rethinking Sec. 3.1, "SyncBN").

    Training: each process computes its count, per-channel mean and sum of squared deviations; one all-reduce
    gathers these from all processes and they are merged, so mean and variance are exactly those of BN over the joint
    batch (different per-process batch sizes included). The all-reduce has a gradient, so backprop also flows through the joint statistics. Normalization uses
    the biased variance; running statistics are updated with the unbiased one and `momentum`, as nn.BatchNorm2d does.
    Eval: the running statistics. Parameter and buffer names are nn.BatchNorm2d's.
    Outside an initialized process group (or with a world size of 1) it is plain BatchNorm, with a warning.
    """

    def __init__(self, num_features, eps=1e-5, momentum=0.1):
        super().__init__()
        self.num_features, self.eps, self.momentum = num_features, eps, momentum
        self.weight = nn.Parameter(torch.ones(num_features))
        self.bias = nn.Parameter(torch.zeros(num_features))
        self.register_buffer("running_mean", torch.zeros(num_features))
        self.register_buffer("running_var", torch.ones(num_features))
        self.register_buffer("num_batches_tracked", torch.tensor(0, dtype=torch.long))
        self._warned = False

    def _synchronized(self):
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            return True
        if not self._warned:
            # The same text for every layer, so Python's default warning filter shows it once per process.
            warnings.warn("SyncBatchNorm: no process group with more than one process; "
                          "computing BatchNorm statistics over the local batch only", stacklevel=3)
            self._warned = True
        return False

    def forward(self, x):
        C = self.num_features
        if not self.training:
            scale = self.weight * (self.running_var + self.eps).rsqrt()  # (C,)
            shift = self.bias - self.running_mean * scale  # (C,)
            return torch.addcmul(_per_channel(shift, x).to(x.dtype), x, _per_channel(scale, x).to(x.dtype))

        xf = x.to(torch.promote_types(x.dtype, torch.float32))  # statistics in float32 at least, as for GroupNorm
        dims = [0, *range(2, x.dim())]  # every dim but the channel one: N, H, W
        local_n = x.numel() // C  # values per channel in this process
        local_mean = xf.sum(dims) / max(local_n, 1)  # (C,)
        local_m2 = (xf - _per_channel(local_mean, x)).square().sum(dims)  # (C,) sum of squared deviations (two-pass)
        stats = torch.cat([local_mean.new_full((1,), local_n), local_mean, local_m2])[None]  # (1, 2C+1)
        if self._synchronized():
            # an all-gather with a gradient: each process fills its own row of a (W, 2C+1) zero table, one summing
            # all-reduce completes the table everywhere
            rows = torch.arange(dist.get_world_size(), device=x.device) == dist.get_rank()  # (W,) one-hot
            stats = _AllReduceSum.apply(stats * rows[:, None])  # (W, 2C+1)
        counts, means, m2s = stats[:, :1], stats[:, 1:C + 1], stats[:, C + 1:]  # (W, 1), (W, C), (W, C)
        n = counts.sum()
        n_safe = n.clamp(min=1)  # a joint batch with no values (e.g. no RoIs anywhere) must not produce NaN
        mean = (counts * means).sum(0) / n_safe  # (C,) BN (Ioffe & Szegedy 2015, Alg. 1): mu_B = 1/m sum x
        # BN Alg. 1: sigma_B^2 = 1/m sum (x - mu_B)^2, merged from the processes' own means and squared deviations
        # (Chan et al. 1979's parallel variance), as torch.nn.SyncBatchNorm does: no E[x^2] - E[x]^2 cancellation.
        var = (m2s.sum(0) + (counts * (means - mean).square()).sum(0)) / n_safe  # (C,)

        with torch.no_grad():
            # nn.BatchNorm2d: running stats use the unbiased variance m / (m - 1) * sigma_B^2; skip an empty batch.
            unbiased = var * n / (n - 1).clamp(min=1)
            m = self.momentum
            self.running_mean.copy_(torch.where(n > 0, (1 - m) * self.running_mean + m * mean, self.running_mean))
            self.running_var.copy_(torch.where(n > 0, (1 - m) * self.running_var + m * unbiased, self.running_var))
            self.num_batches_tracked.add_(1)

        scale = self.weight * (var + self.eps).rsqrt()  # (C,) gamma / sqrt(sigma_B^2 + eps)
        shift = self.bias - mean * scale  # (C,) beta - mu_B * gamma / sqrt(sigma_B^2 + eps)
        return torch.addcmul(_per_channel(shift, x), xf, _per_channel(scale, x)).to(x.dtype)  # Alg. 1: gamma x^ + beta

    def extra_repr(self):
        return f"{self.num_features}, eps={self.eps}, momentum={self.momentum}"


def make_norm(kind, channels, num_groups=32):
    """The normalization switch of the paper (Sec. 3.1): one flag picks the layer used everywhere.

    kind: "gn" (GroupNorm, 32 groups as in Detectron's GN baselines), "syncbn", "bn" (torch.nn.BatchNorm2d, per-GPU
    statistics), "frozen_bn" (the pre-training baseline) or "none" (identity).
    """
    if kind == "gn":
        return GroupNorm(num_groups, channels)  # raises a ValueError naming both numbers if they do not divide
    if kind == "syncbn":
        return SyncBatchNorm(channels)
    if kind == "bn":
        return nn.BatchNorm2d(channels)
    if kind == "frozen_bn":
        return FrozenBatchNorm2d(channels)
    if kind == "none":
        return nn.Identity()
    raise ValueError(f"unknown norm kind {kind!r}; expected one of {', '.join(NORM_KINDS)}")
