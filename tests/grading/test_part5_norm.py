"""Part 5 (assignment.py): Group Normalization (Wu & He 2018, Sec. 3.1, Eqs. 1, 2, 6, 7), the normalization the paper
trains from scratch with; and, advanced, how SyncBN merges the statistics of several processes.

The functions: norm.group_norm, norm.joint_statistics.
"""
import math

import torch
import torch.nn.functional as F

from grading import expect_close
from norm import GroupNorm, group_norm, joint_statistics


def test_group_norm_hand_worked():
    # (N, C, H, W) = (1, 4, 1, 2) in G = 2 groups: {1, 3, 5, 7} (mean 4, variance 5) and {0, 0, 2, -2} (mean 0,
    # variance 2); then gamma = (1, 1, 2, 1), beta = (0, 0, 0, 10) per channel
    x = torch.tensor([[[[1.0, 3.0]], [[5.0, 7.0]], [[0.0, 0.0]], [[2.0, -2.0]]]])
    weight, bias = torch.tensor([1.0, 1.0, 2.0, 1.0]), torch.tensor([0.0, 0.0, 0.0, 10.0])
    s5, s2 = math.sqrt(5 + 1e-5), math.sqrt(2 + 1e-5)
    expected = [[[[-3 / s5, -1 / s5]], [[1 / s5, 3 / s5]], [[0.0, 0.0]], [[10 + 2 / s2, 10 - 2 / s2]]]]
    expect_close(group_norm(x, 2, weight, bias, eps=1e-5), expected, "group_norm of a (1, 4, 1, 2) input, G = 2")
    # eps goes inside the square root: a group {0, 1e-3} (variance 2.5e-7) gives +-5e-4 / sqrt(2.5e-7 + 1e-5)
    tiny = torch.tensor([[[0.0]], [[1e-3]]])[None]  # (1, 2, 1, 1), one group
    expect_close(group_norm(tiny, 1, eps=1e-5), torch.tensor([[[[-1.0]], [[1.0]]]]) * 5e-4 / math.sqrt(2.5e-7 + 1e-5),
                 "group_norm of {0, 1e-3} with eps 1e-5 (eps inside the square root)", atol=1e-4)
    y = group_norm(x.bfloat16(), 2, weight.bfloat16(), bias.bfloat16())
    assert y.dtype == torch.bfloat16, f"group_norm of a bf16 input: expected a bf16 output, got {y.dtype}"


def test_group_norm_matches_torch_values_and_gradients():
    for shape, groups in [((2, 8, 5, 6), 4), ((3, 6, 7), 3), ((2, 4, 3, 3), 1)]:
        g = torch.Generator().manual_seed(0)
        x = torch.randn(shape, generator=g, dtype=torch.float64) * 3 + 1
        weight, bias = torch.randn(shape[1], generator=g, dtype=torch.float64), torch.randn(shape[1], generator=g,
                                                                                         dtype=torch.float64)
        ours_in = [t.clone().requires_grad_() for t in (x, weight, bias)]
        theirs_in = [t.clone().requires_grad_() for t in (x, weight, bias)]
        ours = group_norm(ours_in[0], groups, ours_in[1], ours_in[2])
        theirs = F.group_norm(theirs_in[0], groups, theirs_in[1], theirs_in[2])
        what = f"group_norm of an input {shape} in {groups} groups, as torch.nn.functional.group_norm"
        expect_close(ours, theirs, what)
        ours.pow(2).sum().backward()
        theirs.pow(2).sum().backward()
        for name, a, b in zip(("x", "gamma", "beta"), ours_in, theirs_in):
            expect_close(a.grad, b.grad, f"the gradient for {name} of " + what)


def test_group_norm_extremes_are_layer_norm_and_instance_norm():
    # GN Sec. 3.1, Fig. 2: one group is Layer Norm; one channel per group is Instance Norm
    x = torch.randn(2, 6, 4, 5, generator=torch.Generator().manual_seed(1))
    expect_close(group_norm(x, 1), F.layer_norm(x, x.shape[1:]), "group_norm with G = 1, as layer_norm", atol=1e-4)
    expect_close(group_norm(x, 6), F.instance_norm(x), "group_norm with G = C, as instance_norm", atol=1e-4)


def test_group_norm_does_not_mix_images():
    # what lets GN work at 2 images per GPU: an image's output does not depend on the other images of the batch
    x = torch.randn(2, 8, 3, 3, generator=torch.Generator().manual_seed(2))
    y = x.clone()
    y[1] = y[1] * 100 - 7
    expect_close(group_norm(y, 4)[0], group_norm(x, 4)[0], "image 0's output after image 1 changed")


def test_group_norm_layer_with_plain_ops():
    layer = GroupNorm(4, 8)
    layer.plain_ops = True  # the layer calls group_norm (build_model(plain_ops=True), train.py --plain-ops)
    with torch.no_grad():
        layer.weight.uniform_(0.5, 1.5), layer.bias.uniform_(-1, 1)
    reference = torch.nn.GroupNorm(4, 8)
    reference.load_state_dict(layer.state_dict())
    x = torch.randn(3, 8, 6, 6, generator=torch.Generator().manual_seed(3))
    expect_close(layer(x), reference(x), "GroupNorm(4, 8) with plain_ops, as torch.nn.GroupNorm", atol=1e-4)


def test_joint_statistics_hand_worked():
    # process A holds {1, 3} (count 2, mean 2, squared deviations 1 + 1 = 2), process B {5, 7, 9} (3, 7, 4 + 0 + 4 = 8);
    # the joint batch {1, 3, 5, 7, 9}: count 5, mean 5, biased variance (16 + 4 + 0 + 4 + 16) / 5 = 8
    counts, means, m2s = torch.tensor([2.0, 3.0]), torch.tensor([[2.0], [7.0]]), torch.tensor([[2.0], [8.0]])
    n, mean, var = joint_statistics(counts, means, m2s)
    expect_close(n, 5.0, "the joint count")
    expect_close(mean, [5.0], "the joint mean")
    expect_close(var, [8.0], "the joint biased variance")


def test_joint_statistics_equal_batch_norm_over_all_processes():
    x = torch.randn(10, 3, generator=torch.Generator().manual_seed(4), dtype=torch.float64) * 2 + 5  # 10 values of C=3
    chunks = [x[:4], x[4:4], x[4:]]  # three processes, one with no values (no RoIs on it)
    counts = torch.tensor([float(c.shape[0]) for c in chunks], dtype=torch.float64)
    means = torch.stack([c.mean(0) if len(c) else torch.zeros(3, dtype=torch.float64) for c in chunks])
    m2s = torch.stack([((c - c.mean(0)) ** 2).sum(0) if len(c) else torch.zeros(3, dtype=torch.float64)
                       for c in chunks])
    n, mean, var = joint_statistics(counts, means, m2s)
    expected_var, expected_mean = torch.var_mean(x, dim=0, unbiased=False)
    expect_close(n, 10.0, "the joint count of processes holding 4, 0 and 6 values")
    expect_close(mean, expected_mean, "the joint mean, as the mean over all values")
    expect_close(var, expected_var, "the joint variance, as the biased variance over all values")
    empty = joint_statistics(torch.zeros(2), torch.zeros(2, 3), torch.zeros(2, 3))
    expect_close(torch.stack([empty[1], empty[2]]), torch.zeros(2, 3), "mean and variance of an empty joint batch: "
                 "0, not NaN")
