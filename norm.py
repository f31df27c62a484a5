"""Normalization layers: the variable that "Rethinking ImageNet Pre-training" studies.

He, Girshick & Dollár 2019 (arXiv:1811.08883), Sec. 3.1 "Normalization": a detector trained from scratch needs
normalization that works at detection batch sizes (2 images per GPU). Frozen BN (the usual fine-tuning choice) has
no statistics to freeze when there is no pre-training, and plain BN with 2 images per GPU has too noisy statistics.
The paper uses one of two remedies everywhere (backbone, FPN and heads, Sec. 4):
  - Group Normalization (Wu & He 2018, arXiv:1803.08494, Sec. 3.1 Eqs. 1, 2, 6, 7): statistics over groups of
    channels of one image, independent of the batch size.
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


def _group_statistics(x, num_groups, eps, one_pass=None):
    """x (N, C, *) -> x viewed as (N, G, C/G, S) with S the product of the spatial sizes, the groups' mean mu and
    r = 1 / sqrt(sigma^2 + eps) of GN Eq. 2, both (N, G, 1, 1) and float32 at least: reductions with dtype= or an
    out= of float32 read bf16/fp16 values directly (such calls are also exempt from autocast).

    one_pass (default: on a GPU) takes sigma^2 from torch.var, in one more read of x. Elsewhere sigma^2 is the mean
    of the squared deviations, as Eq. 2 writes it: on a CPU, torch.var (Welford's update, a division per value) measured
    9x slower than that subtraction, square and mean (2 threads, 2x256x64x96 float32: 12 ms against 1.3 ms), while
    on a GPU both are bound by memory and the extra (x - mu) tensor would cost two more passes over the activation.
    """
    N, C, G = x.shape[0], x.shape[1], num_groups
    xg = x.reshape(N, G, C // G, math.prod(x.shape[2:]))  # (N, G, C/G, S); sizes spelled out for N = 0
    stat = torch.float64 if x.dtype == torch.float64 else torch.float32
    mean = torch.mean(xg, (2, 3), keepdim=True, dtype=stat)  # (N, G, 1, 1) mu
    one_pass = x.is_cuda if one_pass is None else one_pass
    if N == 0:
        var = mean.clone()
    elif one_pass:
        var = torch.var(xg, (2, 3), correction=0, keepdim=True, out=torch.empty_like(mean))
    else:
        var = torch.mean((xg - mean).square_(), (2, 3), keepdim=True)  # GN Eq. 2, (x - mu) in float32 at least
    return xg, mean, var.add_(eps).rsqrt_()  # sigma^2 biased, as GN Eq. 2


def _group_norm_no_grad(x, weight, bias, num_groups, eps):
    """GN Eqs. 1, 2, 6, 7 when no gradient is needed (inference): after the statistics, y = x * scale + shift in one
    pass over x, with per-channel scale = gamma * r and shift = beta - mu * gamma * r computed in float32 and applied
    inside the kernel."""
    xg, mean, rstd = _group_statistics(x, num_groups, eps)  # (N, G, C/G, S), (N, G, 1, 1), (N, G, 1, 1)
    N, G, Cg = xg.shape[:3]
    gamma = weight.view(G, Cg, 1) if weight is not None else rstd.new_ones(G, Cg, 1)  # (G, C/G, 1)
    beta = bias.view(G, Cg, 1) if bias is not None else rstd.new_zeros(G, Cg, 1)
    scale = rstd * gamma  # (N, G, C/G, 1): channel c of group g gets gamma_c * r_g
    shift = torch.addcmul(beta, mean, scale, value=-1)  # (N, G, C/G, 1) beta - mu * gamma * r
    per_channel = (N, G * Cg) + (1,) * (x.dim() - 2)  # (N, C, 1, ..., 1), broadcasts against x in its own layout
    return torch.addcmul(shift.view(per_channel), x, scale.view(per_channel), out=torch.empty_like(x))


class _GroupNormFunction(torch.autograd.Function):
    """GN Eqs. 1, 2, 6, 7 with a written-out backward pass, in few passes over the activation and few small ops.

    Per image n and group g (S_i of GN Eq. 7: its L = C/G * H * W values), with r = 1 / sqrt(sigma^2 + eps) (Eq. 2):
        forward   x_hat = (x - mu) * r,   y = gamma * x_hat + beta
        backward  dbeta_c = sum dy,   dgamma_c = sum dy * x_hat                    (sums over n and the pixels)
                  dx = r * (gamma * dy - 1/L sum_S gamma * dy - x_hat/L * sum_S gamma * dy * x_hat)
    The backward is the usual normalization derivative: removing the mean and the scale of a group takes out of
    dx its components along 1 and along x_hat. Both group sums are gamma-weighted sums of the per-channel sums
    db = sum_pixels dy and ds = sum_pixels dy * x_hat, so the backward reads dy three times (the two sums and dx),
    x_hat twice, and writes and reads one dy * x_hat temporary.
    x_hat (not x) is kept for backward: sum dy * x_hat has no cancellation even when |mu| >> sigma, which
    matters when x_hat is stored in bf16. Statistics and per-channel sums are float32 for bf16/fp16 inputs, reduced
    from the input's dtype directly (dtype= or out= of float32); x_hat, y and dx are written in the input's dtype
    (out= with a bf16 destination casts inside the kernel). Two full-size float32 temporaries remain: the
    backward's first dx pass (on purpose, see there) and, on a CPU, the variance's x - mu (_group_statistics).
    Autocast needs no switching off: it leaves in-place ops and calls with out= or dtype= alone, and the rest
    (mul, stack) are not on its lists.
    Everything works on the grouped view (N, G, C/G, S), where per-group (N, G, 1, 1) and per-channel (G, C/G, 1)
    tensors broadcast without reshapes: on a GPU at batch 2 the step is bound by the CPU issuing small ops.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, num_groups, eps):
        xg, mean, rstd = _group_statistics(x, num_groups, eps)  # (N, G, C/G, S), (N, G, 1, 1), (N, G, 1, 1)
        G, Cg = xg.shape[1:3]
        x_hat = torch.addcmul(mean.mul_(rstd).neg_(), xg, rstd, out=torch.empty_like(xg))  # GN Eq. 1: (x - mu) r
        y = x_hat.view(x.shape)
        if weight is not None:  # GN Eq. 6: y = gamma * x_hat + beta, per channel, in x's own memory layout
            per_channel = (G * Cg,) + (1,) * (x.dim() - 2)  # (C, 1, ..., 1)
            y = torch.addcmul(bias.view(per_channel), y, weight.view(per_channel), out=torch.empty_like(x))
        ctx.save_for_backward(x_hat, rstd, weight)
        return y

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dy):
        x_hat, rstd, weight = ctx.saved_tensors  # (N, G, C/G, S), (N, G, 1, 1), (C,) or None
        N, G, Cg, S = x_hat.shape
        dyg = dy.reshape(x_hat.shape)  # (N, G, C/G, S)
        # (2, N, G, C/G, 1): per channel, db = sum over pixels of dy and ds = sum over pixels of dy * x_hat
        sums = torch.stack((dyg.sum(3, keepdim=True, dtype=rstd.dtype),
                            (dyg * x_hat).sum(3, keepdim=True, dtype=rstd.dtype)))
        scale = rstd * (weight.view(G, Cg, 1) if weight is not None else rstd.new_ones(G, Cg, 1))  # (N, G, C/G, 1)
        # (2, N, G, 1, 1): -r/L sum_S gamma * dy and -r/L sum_S gamma * dy * x_hat
        minus_db, minus_ds = (sums * scale).sum(3, keepdim=True).mul_(-1.0 / (Cg * S)).unbind()
        # dx = (r * gamma) * dy + (-r/L sum_S gamma dy) + (-r/L sum_S gamma dy x_hat) * x_hat: two passes, the
        # first in float32 (its two terms may cancel against the third)
        dx = torch.addcmul(torch.addcmul(minus_db, x_hat, minus_ds), dyg, scale, out=torch.empty_like(dyg))
        if weight is None:
            return dx.view(dy.shape), None, None, None, None
        dbeta, dgamma = sums.sum(1).view(2, G * Cg).to(weight.dtype).unbind()  # (C,) each: sums over the images
        return dx.view(dy.shape), dgamma, dbeta, None, None


class GroupNorm(nn.Module):
    """Group Normalization, Wu & He 2018 (arXiv:1803.08494) Sec. 3.1, written out; equal to torch.nn.GroupNorm.

    The C channels of each image are split into G groups of C/G consecutive channels; each group is normalized by its
    own mean and (biased) variance over its C/G * H * W values, then a per-channel affine (gamma, beta) is applied.
    Statistics are computed in float32 (at least) even for bf16 inputs under autocast; the output keeps the input's
    dtype. The backward pass is written out (_GroupNormFunction): left to autograd, the forward's ~15 small ops and
    their float32 copies of the activation took 61 ms of GPU time per R50-GN Mask R-CNN step (H100, bf16, batch 2),
    48 ms with this version. Without gradients (inference), _group_norm_no_grad normalizes in one pass over x once
    the statistics are computed.
    """

    def __init__(self, num_groups, num_channels, eps=1e-5, affine=True):
        super().__init__()
        if num_groups < 1:
            raise ValueError(f"GroupNorm: num_groups must be at least 1, got {num_groups}")
        if num_channels % num_groups != 0:
            raise ValueError(f"GroupNorm: {num_channels} channels do not divide into {num_groups} groups; "
                             f"pass a num_groups that divides {num_channels}")
        self.num_groups, self.num_channels, self.eps, self.affine = num_groups, num_channels, eps, affine
        if affine:
            self.weight = nn.Parameter(torch.ones(num_channels))  # gamma, GN Eq. 6
            self.bias = nn.Parameter(torch.zeros(num_channels))  # beta, GN Eq. 6
        else:
            self.register_parameter("weight", None)
            self.register_parameter("bias", None)

    def forward(self, x):
        if x.dim() < 2 or x.shape[1] != self.num_channels:
            raise ValueError(f"GroupNorm: expected an input (N, {self.num_channels}, ...), got shape {tuple(x.shape)}")
        if torch.is_grad_enabled() and (x.requires_grad or self.affine and self.weight.requires_grad):
            return _GroupNormFunction.apply(x, self.weight, self.bias, self.num_groups, self.eps)
        return _group_norm_no_grad(x, self.weight, self.bias, self.num_groups, self.eps)

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
    batch (different per-process batch sizes included). The all-reduce has a gradient, so backprop also flows through
    the joint statistics. Normalization uses the biased variance; running statistics are updated with the unbiased
    one and `momentum`, as nn.BatchNorm2d does.
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
        if x.dim() < 2 or x.shape[1] != C:
            raise ValueError(f"SyncBatchNorm: expected an input (N, {C}, ...), got shape {tuple(x.shape)}")
        if not self.training:
            scale = self.weight * (self.running_var + self.eps).rsqrt()  # (C,)
            shift = self.bias - self.running_mean * scale  # (C,)
            return torch.addcmul(_per_channel(shift, x).to(x.dtype), x, _per_channel(scale, x).to(x.dtype))

        xf = x.to(torch.promote_types(x.dtype, torch.float32))  # statistics in float32 at least, as for GroupNorm
        dims = [0, *range(2, x.dim())]  # every dim but the channel one: N, H, W
        local_n = x.numel() // C  # values per channel in this process
        synchronized = self._synchronized()
        if not synchronized and local_n == 1:  # as nn.BatchNorm2d; 0 values (no RoIs) is allowed, the output is empty
            raise ValueError(f"SyncBatchNorm: expected more than 1 value per channel when training, got shape "
                             f"{tuple(x.shape)}")
        local_mean = xf.sum(dims) / max(local_n, 1)  # (C,)
        local_m2 = (xf - _per_channel(local_mean, x)).square().sum(dims)  # (C,) sum of squared deviations (two-pass)
        stats = torch.cat([local_mean.new_full((1,), local_n), local_mean, local_m2])[None]  # (1, 2C+1)
        if synchronized:
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
