"""fpn.py: P2..P6 strides and shapes, equality with torchvision's FeaturePyramidNetwork, init, norm placement."""
import math

import pytest
import torch
import torch.nn as nn

from fpn import FPN
from norm import GroupNorm

IN_CHANNELS = (8, 16, 32, 64)  # small stand-ins for (256, 512, 1024, 2048)


def _features(size=64, odd=False):
    """C2..C5 of a size x size image (strides 4..32); with odd=True, sizes that do not halve exactly."""
    sizes = [15, 8, 4, 2] if odd else [size // 4, size // 8, size // 16, size // 32]
    return {f"C{k + 2}": torch.randn(2, c, s, s + 1) for k, (c, s) in enumerate(zip(IN_CHANNELS, sizes))}


def test_fpn_output_names_strides_and_shapes():
    fpn = FPN(in_channels=IN_CHANNELS, out_channels=16, norm="gn", num_groups=4)
    out = fpn(_features(64))
    assert list(out) == ["P2", "P3", "P4", "P5", "P6"]
    # 64 x 64 image: strides 4, 8, 16, 32, 64 (the C maps here are one column wider).
    assert [tuple(p.shape) for p in out.values()] == [(2, 16, 16, 17), (2, 16, 8, 9), (2, 16, 4, 5), (2, 16, 2, 3),
                                                       (2, 16, 1, 2)]
    torch.testing.assert_close(out["P6"], out["P5"][:, :, ::2, ::2])  # P6: stride-2 subsampling of P5


def test_fpn_norm_placement():
    gn = FPN(in_channels=IN_CHANNELS, out_channels=16, norm="gn", num_groups=4)
    assert all(isinstance(s[1], GroupNorm) and s[0].bias is None for s in [*gn.lateral_convs, *gn.output_convs])
    plain = FPN(in_channels=IN_CHANNELS, out_channels=16, norm="none")
    assert all(len(s) == 1 and s[0].bias is not None for s in [*plain.lateral_convs, *plain.output_convs])
    assert gn.out_channels == 16


@pytest.mark.parametrize("odd", [False, True])
def test_fpn_matches_torchvision(odd):
    tv = pytest.importorskip("torchvision")
    from torchvision.ops.feature_pyramid_network import LastLevelMaxPool

    ours = FPN(in_channels=IN_CHANNELS, out_channels=16, norm="none")
    ref = tv.ops.FeaturePyramidNetwork(list(IN_CHANNELS), 16, extra_blocks=LastLevelMaxPool())
    renamed = {k.replace("inner_blocks", "lateral_convs").replace("layer_blocks", "output_convs"): v
               for k, v in ref.state_dict().items()}
    with torch.no_grad():  # non-zero biases, so that a bias in the wrong place would show
        for v in renamed.values():
            if v.dim() == 1:
                v.normal_()
    ours.load_state_dict(renamed)  # strict: the two modules have the same tensors under the renaming
    ref.load_state_dict({k.replace("lateral_convs", "inner_blocks").replace("output_convs", "layer_blocks"): v
                         for k, v in renamed.items()})
    C = _features(64, odd=odd)
    got, expected = ours(C), ref(C)  # torchvision names its outputs after the inputs, plus "pool"
    for p_name, tv_name in zip(["P2", "P3", "P4", "P5", "P6"], ["C2", "C3", "C4", "C5", "pool"]):
        torch.testing.assert_close(got[p_name], expected[tv_name])


def test_fpn_init_is_kaiming_uniform_a1():
    fpn = FPN(norm="none")  # paper sizes: 2048 -> 256 lateral, 256 -> 256 output 3x3
    w = fpn.lateral_convs[3][0].weight  # (256, 2048, 1, 1)
    bound = math.sqrt(3.0 / w[0].numel())  # kaiming_uniform_(a=1): U(-b, b), b = sqrt(6 / ((1 + 1) * fan_in))
    assert w.abs().max() <= bound and w.abs().max() > 0.99 * bound  # 524k samples reach the bound
    assert all(torch.all(s[0].bias == 0) for s in [*fpn.lateral_convs, *fpn.output_convs])


def test_fpn_requires_c2_to_c5():
    fpn = FPN(in_channels=IN_CHANNELS, out_channels=16, num_groups=4)
    features = _features(64)
    del features["C3"]
    with pytest.raises(AssertionError, match="FPN expects"):
        fpn(features)


def test_fpn_backward_reaches_every_parameter():
    fpn = FPN(in_channels=IN_CHANNELS, out_channels=16, norm="gn", num_groups=4)
    # A random projection of the outputs: a plain sum would be blind to every conv before a GN, since with
    # gamma = 1 (the init) the sum of a GN output is sum(beta) * H * W whatever its input.
    sum((p * torch.randn_like(p)).sum() for p in fpn(_features(64)).values()).backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in fpn.parameters())


def test_fpn_gn_runs_under_bf16_autocast():
    fpn = FPN(in_channels=IN_CHANNELS, out_channels=16, norm="gn", num_groups=4)
    C = _features(64)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = fpn(C)
    ref = fpn(C)
    for k in out:
        assert out[k].dtype == torch.bfloat16
        # bf16 keeps 8 significant bits: each conv's inputs and output round by up to 2^-9 relative, so unit-scale
        # outputs differ by a few hundredths (0.035 at most here); float32 statistics are tested in test_norm.py
        torch.testing.assert_close(out[k].float(), ref[k], atol=0.05, rtol=0)


def test_fpn_is_an_nn_module_with_two_module_lists():
    fpn = FPN()
    assert isinstance(fpn.lateral_convs, nn.ModuleList) and len(fpn.lateral_convs) == 4
    assert isinstance(fpn.output_convs, nn.ModuleList) and len(fpn.output_convs) == 4
