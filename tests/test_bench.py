"""bench.py on CPU: the tiny preset runs and gives positive numbers; torchvision's twins are built like our presets."""
import json
import re

import pytest
import torch
from torch import nn

import bench
from model import build_model
from norm import GroupNorm

KEYS = {"params_m", "train_s_per_iter", "train_images_per_s", "train_peak_gib", "infer_s_per_image",
        "detections_per_image"}


def test_synthetic_batch_shapes():
    images, image_sizes, targets = bench.synthetic_batch(2, (60, 90), num_classes=5, device=torch.device("cpu"))
    assert images.shape == (2, 3, 64, 96)  # padded up to multiples of 32
    assert image_sizes == [(60, 90), (60, 90)]
    assert images[:, :, 60:].abs().sum() == 0 and images[:, :, :, 90:].abs().sum() == 0  # zero padding
    for t in targets:
        x1, y1, x2, y2 = t["boxes"].unbind(dim=1)
        assert (x1 < x2).all() and (y1 < y2).all() and (x2 <= 90).all() and (y2 <= 60).all()
        assert t["masks"].shape == (3, 60, 90) and t["masks"].dtype == torch.uint8
        area = (x2 - x1) * (y2 - y1)  # a box-shaped mask fills its box exactly
        assert torch.equal(t["masks"].sum(dim=(1, 2)).float(), area)
        assert ((t["labels"] >= 1) & (t["labels"] < 5)).all()


def test_bench_model_tiny_cpu():
    device = torch.device("cpu")
    torch.manual_seed(0)
    images, image_sizes, targets = bench.synthetic_batch(2, (64, 96), num_classes=5, device=device)
    model = build_model("tiny", num_classes=5)
    result = bench.bench_model(model, (images, image_sizes, targets), (images[:1], image_sizes[:1]), batch_size=2,
                               device=device, iters=2, warmup=1)
    assert set(result) == KEYS
    assert result["train_peak_gib"] is None  # CPU: no peak memory figure
    for key in ("params_m", "train_s_per_iter", "train_images_per_s", "infer_s_per_image"):
        assert result[key] > 0, key
    assert result["train_images_per_s"] == pytest.approx(2 / result["train_s_per_iter"])
    assert result["detections_per_image"] >= 0


def test_main_writes_json(tmp_path):
    out = tmp_path / "bench.json"
    bench.main(["--device", "cpu", "--preset", "tiny", "--size", "64", "96", "--batch-size", "1", "--iters", "1",
                "--warmup", "0", "--num-classes", "3", "--json", str(out)])
    numbers = json.loads(out.read_text())
    assert set(numbers["results"]["ours"]) == KEYS and numbers["ratios"] is None


def test_main_profile_counts_calls_and_host_syncs(capsys):
    bench.main(["--device", "cpu", "--preset", "tiny", "--size", "64", "96", "--batch-size", "1", "--iters", "1",
                "--warmup", "0", "--num-classes", "3", "--profile"])
    line = next(l for l in capsys.readouterr().out.splitlines() if l.startswith("per step: "))
    top, calls, syncs = re.match(r"per step: (\d+) top-level aten calls \((\d+) with nested ones\), (\d+) host syncs",
                                 line).groups()
    # a training step makes thousands of op calls; the samplers' randperm picks and the NMS need at least a few syncs
    assert 1000 < int(top) < int(calls) and int(syncs) > 0


def test_tiny_has_no_torchvision_twin():
    pytest.importorskip("torchvision")
    model, why = bench.build_torchvision_twin("tiny", 81, (128, 160))
    assert model is None and "no torchvision twin" in why


def parameter_counts(model):
    """(all parameters, trainable parameters)."""
    return sum(p.numel() for p in model.parameters()), sum(p.numel() for p in model.parameters() if p.requires_grad)


@pytest.mark.parametrize("preset", ["r50_fpn_gn", "r50_fpn_frozenbn", "tv_maskrcnn_v1"])
def test_torchvision_twin_matches_preset(preset):
    """Built only, never run: the same number of GroupNorm layers (69 in GN-all: 53 ResNet, 8 FPN, 4 + 4 heads)
    and the same trainable and total parameter counts as our preset."""
    pytest.importorskip("torchvision")
    theirs, _ = bench.build_torchvision_twin(preset, 81, (800, 1216))
    ours = build_model(preset, num_classes=81)
    assert sum(isinstance(m, nn.GroupNorm) for m in theirs.modules()) == \
        sum(isinstance(m, GroupNorm) for m in ours.modules()) == (69 if preset == "r50_fpn_gn" else 0)
    assert parameter_counts(ours) == parameter_counts(theirs)  # the same layers, and the same ones frozen
    assert theirs.rpn._post_nms_top_n["training"] == (2000 if preset == "tv_maskrcnn_v1" else 1000)
    assert (theirs.transform.min_size, theirs.transform.max_size) == ((800,), 1216)  # 800x1216 passes unchanged
