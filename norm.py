"""Normalization layers: the variable that "Rethinking ImageNet Pre-training" studies.

He, Girshick & Dollár 2019 (arXiv:1811.08883), Sec. 3.1 "Normalization": a detector trained from scratch needs
normalization that works at detection batch sizes (2 images per GPU). Frozen BN (the usual fine-tuning choice) has
no statistics to freeze when there is no pre-training, and plain BN with 2 images per GPU has too noisy statistics.
The paper uses one of two remedies everywhere (backbone, FPN and heads, Sec. 4):
  - Group Normalization (Wu & He 2018, arXiv:1803.08494, Sec. 3.1 Eqs. 1, 2, 6, 7): statistics over groups of
    channels of one image, independent of the batch size.
  - Synchronized BN (Peng et al. 2018, MegDet): BN whose statistics are computed over the images of all GPUs.
FrozenBatchNorm2d is the pre-training baseline ("BN*"): BN turned into a fixed per-channel affine transform.
The file opens with GroupNorm as the GN paper writes it (group_norm); the GroupNorm layer runs fast_ops.group_norm,
its equal with a written-out backward, unless plain_ops is set. The box, mask and keypoint heads build their conv
blocks with the norm switch here (conv_norm_relu, head_convs).

Shapes: N images, C channels, G groups, H, W spatial size (any number of trailing spatial dims is allowed).
"""
import warnings

import torch
import torch.distributed as dist
import torch.nn as nn

import fast_ops
from related_work import WSConv2d

# gn_ws: GroupNorm after weight-standardized convs (related_work.py; related work, not the paper's recipe)
NORM_KINDS = ("gn", "syncbn", "bn", "frozen_bn", "none", "gn_ws")


def group_norm(x, num_groups, weight=None, bias=None, eps=1e-5):
    """Group Normalization (Wu & He 2018, Sec. 3.1; their Fig. 3, in PyTorch): x (N, C, *) -> the same shape.

    Each image's C channels form G groups of C/G channels; each group is normalized by the mean and the (biased)
    variance of its C/G * H * W values, then every channel gets its own scale gamma and shift beta. Statistics are
    float32 at least, so that bf16 activations under autocast are normalized as float32 ones.
    """
    xg = x.to(torch.promote_types(x.dtype, torch.float32)).unflatten(1, (num_groups, -1))  # (N, G, C/G, *)
    dims = tuple(range(2, xg.dim()))  # GN Eq. 7: S_i is one image's group, its C/G channels and every pixel
    mu = xg.mean(dims, keepdim=True)  # GN Eq. 2: mu_i = 1/m sum_{k in S_i} x_k
    var = ((xg - mu) ** 2).mean(dims, keepdim=True)  # GN Eq. 2: sigma_i^2 = 1/m sum_{k in S_i} (x_k - mu_i)^2
    x_hat = ((xg - mu) / torch.sqrt(var + eps)).flatten(1, 2)  # GN Eq. 1; (N, G, C/G, *) -> (N, C, *)
    if weight is not None:
        per_channel = (-1,) + (1,) * (x.dim() - 2)  # (C, 1, ..., 1)
        x_hat = x_hat * weight.view(per_channel) + bias.view(per_channel)  # GN Eq. 6: y_i = gamma x_hat_i + beta
    return x_hat.to(x.dtype)


class GroupNorm(nn.Module):
    """Group Normalization as a layer (Wu & He 2018, Sec. 3.1); equal to torch.nn.GroupNorm.

    gamma (weight) and beta (bias) are per-channel parameters, initialized to 1 and 0. The forward pass is
    fast_ops.group_norm, proven equal to group_norm above, or group_norm itself when plain_ops is True
    (build_model(plain_ops=True), --plain-ops).
    """

    plain_ops = False

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
        norm = group_norm if self.plain_ops else fast_ops.group_norm
        return norm(x, self.num_groups, self.weight, self.bias, self.eps)

    def extra_repr(self):
        return f"{self.num_groups}, {self.num_channels}, eps={self.eps}, affine={self.affine}"


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


def joint_statistics(counts, means, m2s):
    """SyncBN's merge: each of W processes sends its count n_p (W,), per-channel means (W, C) and sums of squared
    deviations from them (W, C) -> the joint count n (a scalar tensor), mean (C,) and biased variance (C,), exactly
    those of BatchNorm over all n values of every channel.

    BN (Ioffe & Szegedy 2015, Alg. 1): mu_B = 1/m sum x, sigma_B^2 = 1/m sum (x - mu_B)^2, here merged from the
    processes' own means and squared deviations (Chan et al. 1979's parallel variance), as torch.nn.SyncBatchNorm
    does: no E[x^2] - E[x]^2 cancellation. A joint batch with no values (no RoIs anywhere) gives zeros, not NaN.
    """
    counts = counts[:, None]  # (W, 1)
    n = counts.sum()
    n_safe = n.clamp(min=1)
    mean = (counts * means).sum(0) / n_safe  # (C,) mu_B
    var = (m2s.sum(0) + (counts * (means - mean).square()).sum(0)) / n_safe  # (C,) sigma_B^2: within + between
    return n, mean, var


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
        n, mean, var = joint_statistics(stats[:, 0], stats[:, 1:C + 1], stats[:, C + 1:])  # (W,), (W, C), (W, C)

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
    statistics), "frozen_bn" (the pre-training baseline) or "none" (identity); "gn_ws" is GroupNorm too, its convs
    standardize their weights (conv2d below).
    """
    if kind in ("gn", "gn_ws"):
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


def conv2d(in_channels, out_channels, kernel_size, norm="gn", **kwargs):
    """The conv in front of a norm of kind `norm`: nn.Conv2d with a bias only without a norm (a norm's shift
    replaces it); for "gn_ws" related_work.WSConv2d, whose weight is standardized (same parameter names)."""
    conv = WSConv2d if norm == "gn_ws" else nn.Conv2d
    return conv(in_channels, out_channels, kernel_size, bias=norm == "none", **kwargs)


def conv_norm_relu(in_channels, out_channels, norm="gn", num_groups=32):
    """3x3 conv + norm + ReLU, the block of the box, mask and keypoint heads: (R, C, S, S) -> (R, out_channels, S, S).
    The conv has a bias only without a norm (a norm's shift replaces it). Names 0 (conv), 1 (norm), as torchvision."""
    conv = conv2d(in_channels, out_channels, 3, norm, padding=1)
    return nn.Sequential(conv, make_norm(norm, out_channels, num_groups), nn.ReLU(inplace=True))


def head_convs(in_channels, num_convs, conv_dim, norm="gn", num_groups=32):
    """num_convs x conv_norm_relu, the trunk of the box, mask and keypoint heads: (R, C, S, S) -> (R, conv_dim, S, S)
    (or the input itself for num_convs=0). Names convs.i.0 (conv), convs.i.1 (norm), as torchvision's heads."""
    return nn.Sequential(*(conv_norm_relu(in_channels if i == 0 else conv_dim, conv_dim, norm, num_groups)
                           for i in range(num_convs)))
