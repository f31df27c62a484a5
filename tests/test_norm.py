"""norm.py against torch / torchvision: GroupNorm, FrozenBatchNorm2d, SyncBatchNorm (2 processes), make_norm."""
import os
import warnings

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn as nn

import fast_ops
from norm import FrozenBatchNorm2d, GroupNorm, SyncBatchNorm, group_norm, make_norm


def _randomize_affine(*modules, seed=0):
    """Give the modules the same random (non-trivial) affine parameters."""
    g = torch.Generator().manual_seed(seed)
    C = modules[0].weight.shape[0]
    w, b = torch.rand(C, generator=g) + 0.5, torch.randn(C, generator=g)
    with torch.no_grad():
        for m in modules:
            m.weight.copy_(w)
            m.bias.copy_(b)


# ---------------------------------------------------------------------------------------------------- GroupNorm

@pytest.fixture(params=[False, True], ids=["fast", "plain"])
def plain(request):
    """Runs a GroupNorm test with the default forward (fast_ops.group_norm) and with norm.group_norm (plain_ops)."""
    return request.param


def make_gn(*args, plain=False, **kwargs):
    gn = GroupNorm(*args, **kwargs)
    gn.plain_ops = plain
    return gn


@pytest.mark.parametrize("shape", [(2, 64, 7, 9), (3, 12, 5), (2, 12)])
def test_group_norm_matches_torch_values_and_grads(shape, plain):
    G = 4
    ours, ref = make_gn(G, shape[1], plain=plain), nn.GroupNorm(G, shape[1])
    _randomize_affine(ours, ref)
    x = (torch.randn(shape) * 3 + 2).requires_grad_()
    x_ref = x.detach().clone().requires_grad_()
    y, y_ref = ours(x), ref(x_ref)
    torch.testing.assert_close(y, y_ref)
    g = torch.randn(shape)
    (y * g).sum().backward()
    (y_ref * g).sum().backward()
    torch.testing.assert_close(x.grad, x_ref.grad)
    torch.testing.assert_close(ours.weight.grad, ref.weight.grad)
    torch.testing.assert_close(ours.bias.grad, ref.bias.grad)


def test_group_norm_hand_worked(plain):
    # 1 image, 4 channels, 1x1 pixel, 2 groups: group (0, 4) has mean 2, variance 4 -> (-1, +1);
    # group (10, 12) has mean 11, variance 1 -> (-1, +1). With gamma = (1, 1, 2, 2), beta = (0, 0, 0, 5):
    x = torch.tensor([0.0, 4.0, 10.0, 12.0]).view(1, 4, 1, 1)
    gn = make_gn(2, 4, eps=0.0, plain=plain)
    with torch.no_grad():
        gn.weight.copy_(torch.tensor([1.0, 1.0, 2.0, 2.0]))
        gn.bias.copy_(torch.tensor([0.0, 0.0, 0.0, 5.0]))
    torch.testing.assert_close(gn(x).flatten(), torch.tensor([-1.0, 1.0, -2.0, 7.0]))


def test_group_norm_without_affine(plain):
    x = torch.randn(2, 8, 3, 3)
    torch.testing.assert_close(make_gn(2, 8, affine=False, plain=plain)(x), nn.GroupNorm(2, 8, affine=False)(x))
    x = (torch.randn(2, 8, 3, 3) * 2 + 1).requires_grad_()
    x_ref = x.detach().clone().requires_grad_()
    g = torch.randn(2, 8, 3, 3)
    (make_gn(2, 8, affine=False, plain=plain)(x) * g).sum().backward()
    (nn.GroupNorm(2, 8, affine=False)(x_ref) * g).sum().backward()
    torch.testing.assert_close(x.grad, x_ref.grad)


@pytest.mark.parametrize("grad", [True, False])
def test_group_norm_channels_last_input(grad, plain):
    # --channels-last: NHWC activations are normalized like NCHW ones and the output keeps the NHWC layout
    ours, ref = make_gn(4, 16, plain=plain), nn.GroupNorm(4, 16)
    _randomize_affine(ours, ref)
    x = (torch.randn(2, 16, 5, 6) * 3 + 2).contiguous(memory_format=torch.channels_last).requires_grad_(grad)
    x_ref = x.detach().contiguous().requires_grad_(grad)
    y, y_ref = ours(x), ref(x_ref)
    assert y.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(y, y_ref)
    if grad:
        g = torch.randn(2, 16, 5, 6)
        (y * g).sum().backward()
        (y_ref * g).sum().backward()
        torch.testing.assert_close(x.grad, x_ref.grad)
        torch.testing.assert_close(ours.weight.grad, ref.weight.grad)


def test_group_norm_bf16_autocast_uses_float32_statistics(plain):
    # A bf16 activation with a large offset: its bf16 mean (8 significant bits) would be off by about 0.1-0.5, i.e.
    # by a large fraction of its standard deviation; statistics in float32 keep the result within bf16 rounding.
    x = (torch.randn(2, 32, 8, 8) + 100.0).bfloat16()
    gn = make_gn(8, 32, plain=plain)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = gn(x)
    assert y.dtype == torch.bfloat16
    y_ref = nn.GroupNorm(8, 32)(x.float())  # same bf16 input values, computed in float32
    torch.testing.assert_close(y.float(), y_ref, atol=2e-2, rtol=1e-2)


def test_group_norm_bf16_backward_matches_float64(plain):
    # The written-out backward on bf16 activations with a large offset (|mu| = 100 sigma): gradients within bf16
    # rounding (2^-7 of the largest gradient) of float64 GN on the same input values. A backward built on
    # sum(dy * x) - mu * sum(dy) with bf16 products would lose about 100 * 2^-9 here, far outside this tolerance.
    torch.manual_seed(0)
    x = (torch.randn(2, 32, 8, 8) + 100.0).bfloat16().requires_grad_()
    gn, ref = make_gn(8, 32, plain=plain), nn.GroupNorm(8, 32).double()
    _randomize_affine(gn, ref)
    dy = torch.randn(2, 32, 8, 8).bfloat16()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        gn(x).backward(dy)
    x_ref = x.detach().double().requires_grad_()
    ref(x_ref).backward(dy.double())
    for ours, theirs in [(x.grad, x_ref.grad), (gn.weight.grad, ref.weight.grad), (gn.bias.grad, ref.bias.grad)]:
        assert (ours.double() - theirs).abs().max() <= 2 ** -7 * theirs.abs().max()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fast_group_norm_inference_path_equals_training_path(dtype):
    # Without gradients fast_ops.group_norm takes a one-pass path (x * scale + shift); it must give the autograd
    # path's output.
    gn = GroupNorm(4, 16)
    _randomize_affine(gn)
    x = (torch.randn(2, 16, 5, 6) * 2 + 10).to(dtype)
    with torch.no_grad():
        y_inference = gn(x)
    y_training = gn(x.clone().requires_grad_())
    assert y_training.requires_grad and not y_inference.requires_grad
    assert y_inference.dtype == y_training.dtype == dtype
    tol = {} if dtype == torch.float32 else {"atol": 0.05, "rtol": 0.02}  # bf16: one rounding of y apart
    torch.testing.assert_close(y_inference, y_training.detach(), **tol)


@pytest.mark.parametrize("one_pass", [True, False])
@pytest.mark.parametrize("grad", [True, False])
def test_fast_group_norm_both_variance_paths(one_pass, grad):
    # GPUs take sigma^2 from torch.var (one pass), CPUs as the mean of (x - mu)^2; CI runs on a CPU, so both are
    # called here. Input with |mu| = 100 sigma: both must give float64's normalization of the same values to float32
    # precision. E[x^2] - mu^2 in float32 would lose ~1e4 * 2^-24 of the variance, i.e. fail this tolerance.
    torch.manual_seed(0)
    x = (torch.randn(2, 16, 5, 6) * 0.5 + 50.0).requires_grad_(grad)
    y = fast_ops.group_norm(x, 4, one_pass=one_pass)
    torch.testing.assert_close(y.double(), group_norm(x.detach().double(), 4), rtol=1e-4, atol=1e-4)


def test_group_norm_float64_gradcheck(plain):
    gn = make_gn(3, 6, plain=plain).double()
    _randomize_affine(gn)
    x = torch.randn(2, 6, 3, 4, dtype=torch.float64, requires_grad=True)
    w, b = gn.weight.detach().clone().requires_grad_(), gn.bias.detach().clone().requires_grad_()
    # Finite differences against autograd, for the input and for gamma and beta (passed in place of the module's).
    assert torch.autograd.gradcheck(
        lambda x, w, b: torch.func.functional_call(gn, {"weight": w, "bias": b}, (x,)), (x, w, b))


def test_group_norm_empty_batch(plain):
    # The mask head sees zero RoIs when an image batch has no positive proposals: GN must still run and keep
    # gamma and beta in the graph (zero gradients, not None), as torch.nn.GroupNorm does.
    gn = make_gn(4, 8, plain=plain)
    x = torch.randn(0, 8, 14, 14, requires_grad=True)
    y = gn(x)
    assert y.shape == (0, 8, 14, 14)
    y.sum().backward()
    assert torch.equal(gn.weight.grad, torch.zeros(8)) and torch.equal(gn.bias.grad, torch.zeros(8))


# ---------------------------------------------------------------------------------------------- FrozenBatchNorm2d

def _random_bn(C, seed=0):
    bn = nn.BatchNorm2d(C)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        bn.weight.copy_(torch.rand(C, generator=g) + 0.5)
        bn.bias.copy_(torch.randn(C, generator=g))
        bn.running_mean.copy_(torch.randn(C, generator=g))
        bn.running_var.copy_(torch.rand(C, generator=g) + 0.1)
        bn.num_batches_tracked.fill_(7)
    return bn


def test_frozen_bn_matches_torchvision_and_loads_bn_state_dict():
    tv = pytest.importorskip("torchvision")
    bn = _random_bn(16).eval()
    ours, ref = FrozenBatchNorm2d(16), tv.ops.misc.FrozenBatchNorm2d(16)
    ours.load_state_dict(bn.state_dict())  # strict; the BN state dict carries num_batches_tracked
    ref.load_state_dict(bn.state_dict())
    assert "num_batches_tracked" not in ours.state_dict()
    assert list(ours.parameters()) == []  # nothing trains
    x = torch.randn(2, 16, 5, 6)
    torch.testing.assert_close(ours(x), ref(x))
    torch.testing.assert_close(ours(x), bn(x))  # FrozenBN == BN in eval mode


def test_frozen_bn_hand_worked():
    # w=2, b=1, rm=3, rv=4-eps: y = (x - 3) / 2 * 2 + 1 = x - 2
    fbn = FrozenBatchNorm2d(1)
    fbn.weight.fill_(2.0)
    fbn.bias.fill_(1.0)
    fbn.running_mean.fill_(3.0)
    fbn.running_var.fill_(4.0 - fbn.eps)
    x = torch.tensor([0.0, 2.0, 5.0]).view(1, 1, 1, 3)
    torch.testing.assert_close(fbn(x).flatten(), torch.tensor([-2.0, 0.0, 3.0]))


# ---------------------------------------------------------------------------------------------------- make_norm

def test_make_norm_kinds():
    assert type(make_norm("gn", 64)) is GroupNorm and make_norm("gn", 64).num_groups == 32
    assert make_norm("gn", 48, num_groups=16).num_groups == 16
    assert type(make_norm("syncbn", 8)) is SyncBatchNorm
    assert type(make_norm("bn", 8)) is nn.BatchNorm2d
    assert type(make_norm("frozen_bn", 8)) is FrozenBatchNorm2d
    assert type(make_norm("none", 8)) is nn.Identity


def test_make_norm_errors():
    with pytest.raises(ValueError, match="GroupNorm: 48 channels do not divide into 32 groups"):
        make_norm("gn", 48)
    with pytest.raises(ValueError, match="unknown norm kind 'batchnorm'"):
        make_norm("batchnorm", 8)


def test_group_norm_input_errors():
    with pytest.raises(ValueError, match="GroupNorm: num_groups must be at least 1, got 0"):
        GroupNorm(0, 8)
    gn = GroupNorm(2, 8)
    with pytest.raises(ValueError, match=r"GroupNorm: expected an input \(N, 8, ...\), got shape \(8,\)"):
        gn(torch.randn(8))
    with pytest.raises(ValueError, match=r"GroupNorm: expected an input \(N, 8, ...\), got shape \(2, 6, 3, 3\)"):
        gn(torch.randn(2, 6, 3, 3))


# -------------------------------------------------------------------------------------------------- SyncBatchNorm

def test_sync_bn_single_process_is_batch_norm_and_warns_once():
    assert not (dist.is_available() and dist.is_initialized())
    ours, ref = SyncBatchNorm(6), nn.BatchNorm2d(6)
    _randomize_affine(ours, ref)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for step in range(2):  # two steps: the running statistics compound the momentum update
            x = (torch.randn(3, 6, 4, 5) * 2 + 1).requires_grad_()
            x_ref = x.detach().clone().requires_grad_()
            y, y_ref = ours(x), ref(x_ref)
            torch.testing.assert_close(y, y_ref)
            g = torch.randn_like(y)
            (y * g).sum().backward()
            (y_ref * g).sum().backward()
            torch.testing.assert_close(x.grad, x_ref.grad)
    assert len([w for w in caught if "SyncBatchNorm" in str(w.message)]) == 1
    torch.testing.assert_close(ours.weight.grad, ref.weight.grad)
    torch.testing.assert_close(ours.bias.grad, ref.bias.grad)
    torch.testing.assert_close(ours.running_mean, ref.running_mean)
    torch.testing.assert_close(ours.running_var, ref.running_var)
    assert ours.num_batches_tracked.item() == ref.num_batches_tracked.item() == 2
    assert ours.state_dict().keys() == ref.state_dict().keys()
    ours.eval(), ref.eval()
    x = torch.randn(2, 6, 3, 3)
    torch.testing.assert_close(ours(x), ref(x))


def test_sync_bn_empty_batch_keeps_running_stats():
    bn = SyncBatchNorm(4)
    with pytest.warns(UserWarning, match="SyncBatchNorm"):
        y = bn(torch.randn(0, 4, 7, 7))
    assert y.shape == (0, 4, 7, 7) and not torch.isnan(bn.running_mean).any()
    assert torch.equal(bn.running_mean, torch.zeros(4)) and torch.equal(bn.running_var, torch.ones(4))


def test_sync_bn_input_errors():
    bn = SyncBatchNorm(4)
    for mode in (bn.train, bn.eval):
        mode()
        with pytest.raises(ValueError, match=r"SyncBatchNorm: expected an input \(N, 4, ...\), got shape \(2, 3, 5\)"):
            bn(torch.randn(2, 3, 5))
    bn.train()
    with pytest.warns(UserWarning, match="SyncBatchNorm"):  # local BatchNorm: one value per channel has no variance
        with pytest.raises(ValueError, match=r"expected more than 1 value per channel when training, got shape "
                                             r"\(1, 4, 1, 1\)"):
            bn(torch.randn(1, 4, 1, 1))
    bn.eval()
    assert bn(torch.randn(1, 4, 1, 1)).shape == (1, 4, 1, 1)  # the running statistics need no batch


def test_frozen_bn_and_sync_bn_eval_keep_bf16():
    x = torch.randn(2, 4, 3, 3).bfloat16()
    for layer in (FrozenBatchNorm2d(4), SyncBatchNorm(4).eval()):
        assert layer(x).dtype == torch.bfloat16


# The joint batch: 4 images, split unevenly (1 + 3) so that averaging per-process means would be wrong.
_SPLIT = (0, 1, 4)


def _joint_batch():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, 5, 3, 4, generator=g) * 2 + 1
    grad_out = torch.randn(4, 5, 3, 4, generator=g)
    return x, grad_out


def _sync_bn_worker(rank, world_size, init_file, out_dir):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    try:
        x, grad_out = _joint_batch()
        lo, hi = _SPLIT[rank], _SPLIT[rank + 1]
        x = x[lo:hi].clone().requires_grad_()
        bn = SyncBatchNorm(5)
        _randomize_affine(bn)
        y = bn(x)
        (y * grad_out[lo:hi]).sum().backward()
        bn.eval()
        y_eval = bn(x.detach())
        torch.save({"y": y.detach(), "x_grad": x.grad, "w_grad": bn.weight.grad, "b_grad": bn.bias.grad,
                    "running_mean": bn.running_mean, "running_var": bn.running_var, "y_eval": y_eval},
                   os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_sync_bn_two_processes_equals_batch_norm_on_joint_batch(tmp_path):
    world_size = 2
    mp.spawn(_sync_bn_worker, args=(world_size, str(tmp_path / "init"), str(tmp_path)), nprocs=world_size)
    r = [torch.load(tmp_path / f"rank{i}.pt") for i in range(world_size)]

    x, grad_out = _joint_batch()
    x.requires_grad_()
    ref = nn.BatchNorm2d(5)
    _randomize_affine(ref)
    y = ref(x)
    (y * grad_out).sum().backward()
    ref.eval()
    y_eval = ref(x.detach())

    torch.testing.assert_close(torch.cat([ri["y"] for ri in r]), y.detach())
    torch.testing.assert_close(torch.cat([ri["x_grad"] for ri in r]), x.grad)
    # Each process holds the gradient of its own loss; DDP would average them, here we compare the sum.
    torch.testing.assert_close(r[0]["w_grad"] + r[1]["w_grad"], ref.weight.grad)
    torch.testing.assert_close(r[0]["b_grad"] + r[1]["b_grad"], ref.bias.grad)
    for ri in r:  # every process ends with the same running statistics: those of the joint batch
        torch.testing.assert_close(ri["running_mean"], ref.running_mean)
        torch.testing.assert_close(ri["running_var"], ref.running_var)
    torch.testing.assert_close(torch.cat([ri["y_eval"] for ri in r]), y_eval)
