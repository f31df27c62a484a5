"""related_work.py and its train.py flags (related work, off by default): Weight Standardization, CBAM, network
slimming; flags off leave everything as it was; a changed flag on --resume is refused."""
import argparse
import json
import shutil

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import checkpoint
import evaluate
import train
from backbone import Bottleneck
from model import build_model
from norm import FrozenBatchNorm2d, GroupNorm, SyncBatchNorm
from related_work import (CBAM, ChannelAttention, SpatialAttention, WSConv2d, scale_factors, slimming_penalty,
                          slimming_report, standardize_weight)
from shapes import make_shapes


def gn_model(norm="gn", **kwargs):
    return build_model("tiny", num_classes=3, norm=norm, fpn_norm=norm, head_norm=norm, **kwargs)


# ------------------------------------------------------------------------------------------ Weight Standardization

def test_standardized_weight_has_zero_mean_and_unit_variance_per_output_channel():
    w = torch.randn(8, 4, 3, 3, dtype=torch.float64) * 3 + 1
    w_hat = standardize_weight(w)
    torch.testing.assert_close(w_hat.mean((1, 2, 3)), torch.zeros(8, dtype=torch.float64))
    var = w.var((1, 2, 3), unbiased=False)
    # biased variance, eps = 1e-5 inside the square root: var(W_hat) = var / (var + eps)
    torch.testing.assert_close(w_hat.var((1, 2, 3), unbiased=False), var / (var + 1e-5))
    torch.testing.assert_close(w_hat.var((1, 2, 3), unbiased=False), torch.ones(8, dtype=torch.float64), atol=1e-5,
                               rtol=0)


def test_ws_conv_is_a_conv_of_the_standardized_weight_and_gradients_flow():
    conv = WSConv2d(2, 3, 3, padding=1, bias=False).double()
    x = torch.randn(2, 2, 5, 4, dtype=torch.float64)
    torch.testing.assert_close(conv(x), F.conv2d(x, standardize_weight(conv.weight), padding=1))
    assert list(conv.state_dict()) == list(nn.Conv2d(2, 3, 3, bias=False).state_dict()) == ["weight"]
    w = conv.weight.detach().clone().requires_grad_()
    assert torch.autograd.gradcheck(lambda x, w: F.conv2d(x, standardize_weight(w), padding=1),
                                    (x.requires_grad_(), w))


def test_gn_ws_standardizes_every_conv_before_a_norm_and_keeps_the_names():
    plain, ws = gn_model(), gn_model("gn_ws")
    assert {k: v.shape for k, v in plain.state_dict().items()} == {k: v.shape for k, v in ws.state_dict().items()}
    convs = {name: type(m) for name, m in ws.named_modules() if isinstance(m, nn.Conv2d)}
    before_norm = {name for name, m in plain.named_modules() if isinstance(m, nn.Conv2d) and m.bias is None}
    assert before_norm and {name for name, kind in convs.items() if kind is WSConv2d} == before_norm
    assert any(n.startswith("fpn.") for n in before_norm) and any(".mask_head.convs." in n for n in before_norm)
    assert convs["rpn.head.conv"] is nn.Conv2d and convs["roi_heads.mask_head.mask_logits"] is nn.Conv2d


def test_gn_ws_with_imagenet_weights_is_refused():
    with pytest.raises(SystemExit, match="trained without Weight Standardization"):
        train.resolve(train.get_args(["--device", "cpu", "--norm", "gn_ws", "--init", "imagenet",
                                      "--pretrained", "backbone.pth"]))


# ---------------------------------------------------------------------------------------------------------- CBAM

def test_cbam_shapes_and_gradients():
    x = torch.randn(2, 16, 5, 6, dtype=torch.float64)
    assert ChannelAttention(16).fc1.out_features == 1  # 16 // 16; a thin model keeps one hidden unit
    assert ChannelAttention(8).fc1.out_features == 1 and ChannelAttention(64).fc1.out_features == 4
    channel, spatial = ChannelAttention(16).double(), SpatialAttention().double()
    assert channel(x).shape == (2, 16, 1, 1) and spatial(x).shape == (2, 1, 5, 6)
    cbam = CBAM(16).double()
    assert cbam(x).shape == x.shape
    torch.testing.assert_close(cbam(x), spatial_of(cbam, channel_of(cbam, x)))
    assert torch.autograd.gradcheck(cbam, (x.requires_grad_(),))


def channel_of(cbam, x):
    """CBAM Eq. 2 written out: sigmoid(W1 relu(W0 avg) + W1 relu(W0 max)) times x."""
    fc1, fc2 = cbam.channel.fc1, cbam.channel.fc2
    mlp = lambda d: fc2(torch.relu(fc1(d)))
    return torch.sigmoid(mlp(x.mean((2, 3))) + mlp(x.amax((2, 3))))[:, :, None, None] * x


def spatial_of(cbam, x):
    """CBAM Eq. 3 written out: sigmoid(conv7x7([mean over channels; max over channels])) times x."""
    pooled = torch.stack([x.mean(1), x.amax(1)], dim=1)
    return torch.sigmoid(F.conv2d(pooled, cbam.spatial.conv.weight, cbam.spatial.conv.bias, padding=3)) * x


def test_cbam_sits_after_the_last_norm_before_the_residual_addition():
    block = Bottleneck(64, 16, norm="gn", num_groups=8, attention="cbam").eval()
    x = torch.randn(1, 64, 6, 6)
    calls = []
    block.cbam.register_forward_hook(lambda module, inputs, output: calls.append(inputs[0]))
    block.bn3.register_forward_hook(lambda module, inputs, output: calls.append(output))
    block.cbam.forward = lambda out: torch.zeros_like(out)  # attention that blocks the residual branch ...
    torch.testing.assert_close(block(x), torch.relu(x))  # ... leaves ReLU(identity): it sits before the addition
    assert torch.equal(calls[0], calls[1])  # its input is bn3's output


def test_cbam_adds_new_names_only_and_weights_without_them_say_so(tmp_path):
    plain, cbam = gn_model(), gn_model(attention="cbam")
    new = [k for k in cbam.state_dict() if k not in plain.state_dict()]
    assert "backbone.layer1.0.cbam.channel.fc1.weight" in new and all(".cbam." in k for k in new)
    assert {k: v.shape for k, v in cbam.state_dict().items() if k not in new} == \
           {k: v.shape for k, v in plain.state_dict().items()}
    path = str(tmp_path / "backbone.pth")
    torch.save(plain.backbone.state_dict(), path)
    lines = []
    checkpoint.load_pretrained(cbam.backbone, path, log=lines.append)
    assert any("has no CBAM weights" in line and f"its {len(new)} CBAM tensors" in line for line in lines)
    torch.save(plain.state_dict(), path)
    lines.clear()
    checkpoint.load_weights(cbam, path, log=lines.append)
    assert any("has no CBAM weights" in line for line in lines)


def test_cbam_with_vgg_is_refused():
    with pytest.raises(SystemExit, match="ResNet bottlenecks"):
        train.resolve(train.get_args(["--device", "cpu", "--preset", "vgg16_faster", "--attention", "cbam"]))


# ------------------------------------------------------------------------------------------------ Network slimming

@pytest.mark.parametrize("norm, layer", [("gn", GroupNorm), ("syncbn", SyncBatchNorm), ("bn", nn.BatchNorm2d)])
def test_scale_factors_are_the_norm_layers_gammas(norm, layer):
    model = gn_model(norm, attention="cbam")
    gammas = {id(m.weight) for m in model.modules() if isinstance(m, layer)}
    assert gammas and {id(p) for p in scale_factors(model).values()} == gammas
    frozen = build_model("r50_fpn_frozenbn", num_classes=3, layers=(1, 1, 1, 1))
    assert any(isinstance(m, FrozenBatchNorm2d) for m in frozen.modules()) and not scale_factors(frozen)


def test_slimming_penalty_equals_its_formula():
    model = gn_model()
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, GroupNorm):
                m.weight.copy_(torch.randn(m.weight.shape, generator=g))
    expected = 1e-4 * sum(m.weight.abs().sum() for m in model.modules() if isinstance(m, GroupNorm))
    penalty = slimming_penalty(model, 1e-4)
    torch.testing.assert_close(penalty, expected)
    penalty.backward()  # the subgradient: lambda * sign(gamma)
    gn = model.backbone.bn1
    torch.testing.assert_close(gn.weight.grad, 1e-4 * gn.weight.sign())


def test_slimming_report_counts_channels_and_parameters():
    model = nn.Sequential(nn.Conv2d(3, 4, 3, bias=False), GroupNorm(2, 4), nn.ReLU(),
                          nn.Conv2d(4, 6, 1, bias=False), GroupNorm(2, 6))
    with torch.no_grad():
        model[1].weight.copy_(torch.tensor([0.001, 0.5, -0.005, 1.0]))
        model[4].weight.copy_(torch.tensor([0.0, 0.0, 0.0, 1.0, -1.0, 0.02]))
    report = slimming_report(model, threshold=1e-2)
    # per pruned channel: its conv row (3 x 3 x 3 = 27, then 4 x 1 x 1 = 4) and the norm's gamma and beta
    assert report["layers"] == [("1", 4, 2, 2 * (27 + 2)), ("4", 6, 3, 3 * (4 + 2))]
    assert (report["pruned"], report["channels"], report["saved"]) == (5, 10, 76)
    assert report["total"] == 108 + 8 + 24 + 12


# ------------------------------------------------------------------------------------ flags off, records, resume

def test_flags_off_build_the_default_model_and_read_the_data_as_it_is():
    args = train.resolve(train.get_args(["--device", "cpu"]))
    assert (args.random_erasing, args.cutmix, args.yoco, args.attention, args.slim) == (None, False, False, None, 0)
    model = build_model("tiny", num_classes=3)
    assert not any(isinstance(m, (WSConv2d, CBAM)) for m in model.modules())
    assert not any(".cbam." in k for k in model.state_dict())
    dataset = object()
    assert train.augmented(args, dataset) is dataset  # the loader reads data.py's items: the same RNG draws


RELATED = [["--random-erasing", "object"], ["--cutmix"], ["--yoco"], ["--attention", "cbam"], ["--slim", "1e-5"],
           ["--norm", "gn_ws"]]


def _checkpoint_of(path, args):
    """A checkpoint file of a run with these flags, as load_for_resume reads it."""
    torch.save({"model": {}, "optimizer": {}, "rng": [], "iteration": 1, "seen": {}, "args": dict(vars(args))}, path)
    return str(path)


@pytest.mark.parametrize("flag", RELATED, ids=lambda flag: flag[0])
def test_a_changed_related_work_flag_makes_another_run(flag, tmp_path):
    plain = train.resolve(train.get_args(["--device", "cpu"]))
    other = train.resolve(train.get_args(["--device", "cpu", *flag]))
    with pytest.raises(SystemExit, match=f"{flag[0]} "):  # turned on for a resume of the plain run
        checkpoint.load_for_resume(_checkpoint_of(tmp_path / "plain.pth", plain), other)
    with pytest.raises(SystemExit, match=f"{flag[0]} "):  # and off again
        checkpoint.load_for_resume(_checkpoint_of(tmp_path / "other.pth", other), plain)
    old = argparse.Namespace(**{k: v for k, v in vars(plain).items() if k not in checkpoint.RELATED_WORK_FLAGS})
    assert checkpoint.load_for_resume(_checkpoint_of(tmp_path / "old.pth", old), plain)  # a run from before them


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    root = tmp_path_factory.mktemp("shapes")
    make_shapes(str(root), num_train=6, num_val=2, seed=0)
    return root


def run_args(shapes, out, *extra):
    return ["--train-ann", str(shapes / "annotations" / "instances_train.json"),
            "--train-images", str(shapes / "train"),
            "--val-ann", str(shapes / "annotations" / "instances_val.json"), "--val-images", str(shapes / "val"),
            "--data", "custom", "--preset", "tiny", "--device", "cpu", "--batch-size", "2", "--min-size", "64",
            "--workers", "0", "--log-period", "1", "--warmup-iters", "1", "--no-eval", "--output-dir", str(out),
            *extra]


def test_all_related_work_trains_is_recorded_and_a_changed_flag_on_resume_is_refused(shapes, tmp_path, capsys):
    flags = ["--random-erasing", "both", "--cutmix", "--yoco", "--attention", "cbam", "--slim", "1e-4",
             "--norm", "gn_ws"]
    train.main(run_args(shapes, tmp_path, "--max-iters", "2", *flags))
    recorded = json.loads((tmp_path / "args.json").read_text())
    assert {k: recorded[k] for k in checkpoint.RELATED_WORK_FLAGS} == {
        "random_erasing": "both", "cutmix": True, "yoco": True, "attention": "cbam", "slim": 1e-4}
    assert recorded["norm"] == "gn_ws"
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert all(row["loss_slim"] > 0 and torch.isfinite(torch.tensor(row["loss"])) for row in rows)
    without = [f for f in flags if f not in ("--yoco",)]
    with pytest.raises(SystemExit, match=r"--yoco True -> False"):
        train.main(run_args(shapes, tmp_path, "--max-iters", "3", "--resume", "auto", *without))
    capsys.readouterr()
    report = evaluate.main(["--checkpoint", str(tmp_path / "model_0000002.pth"), "--device", "cpu", "--workers", "0",
                            "--slim-report"])  # rebuilds the CBAM, gn_ws model from the run's flags
    assert report["channels"] > 0 and "all norm layers:" in capsys.readouterr().out
    ckpt = torch.load(tmp_path / "model_0000002.pth", weights_only=False)
    ckpt["args"].update(train_ann="/gone/train.json", val_ann="/gone/val.json", data="/gone")
    torch.save(ckpt, tmp_path / "moved.pth")  # the data set is not needed for the report
    assert evaluate.main(["--checkpoint", str(tmp_path / "moved.pth"), "--slim-report"]) == report


@pytest.mark.parametrize("preset_flags", [["--preset", "vgg16_faster"], ["--norm", "none"]])
def test_slim_without_trainable_norm_scales_is_refused(shapes, tmp_path, preset_flags):
    with pytest.raises(SystemExit, match="--slim: preset .* has no trainable norm scales"):
        train.main(run_args(shapes, tmp_path, "--max-iters", "1", "--slim", "1e-4", *preset_flags))


def test_resume_with_related_work_is_exact(shapes, tmp_path):
    flags = ["--random-erasing", "both", "--cutmix", "--yoco", "--attention", "cbam", "--slim", "1e-4",
             "--max-iters", "4", "--ckpt-period", "2"]
    full, resumed = tmp_path / "full", tmp_path / "resumed"
    train.main(run_args(shapes, full, *flags))
    resumed.mkdir()
    shutil.copy(full / "model_0000002.pth", resumed / "model_0000002.pth")
    train.main(run_args(shapes, resumed, *flags, "--resume", "auto"))
    rows = lambda run: [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    drop_time = lambda row: {k: v for k, v in row.items() if k != "sec_per_iter"}
    assert [drop_time(r) for r in rows(full)[2:]] == [drop_time(r) for r in rows(resumed)]
    a, b = (torch.load(run / "model_0000004.pth", weights_only=False)["model"] for run in (full, resumed))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_cutmix_and_yoco_refuse_data_without_masks_or_with_keypoints(shapes, tmp_path, monkeypatch):
    for has_masks, num_keypoints, what in ((False, 0, "no masks"), (True, 17, "keypoints")):
        dataset = type("Data", (), {"has_masks": has_masks, "num_keypoints": num_keypoints, "source": "json",
                                    "classes": []})()
        monkeypatch.setattr(train.data, "build_dataset", lambda *args, **kwargs: dataset)
        for flag in ("--cutmix", "--yoco"):
            args = train.resolve(train.get_args(run_args(shapes, tmp_path, flag)))
            with pytest.raises(SystemExit, match=f"recompute boxes from instance masks.*json has {what}"):
                train.load_data(args)
