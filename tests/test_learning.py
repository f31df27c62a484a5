"""Learning is tested: the tiny model, trained from scratch on CPU, must learn real pedestrians (PennFudanPed).

An untrained detector scores box AP50 ~ 0 here; after a few minutes of training on 8 images it must reach
AP50 >= 0.7 on those same images. This checks the whole path: data -> model -> losses -> SGD -> inference ->
COCO results -> COCOeval.
"""
import os

import pytest
import torch

import data
import evaluate
from conftest import SHARED_DATA, train_briefly
from model import build_model

PENNFUDAN = os.path.join(SHARED_DATA, "PennFudanPed")


@pytest.mark.skipif(not os.path.isdir(PENNFUDAN), reason=f"real data not found at {PENNFUDAN}")
def test_tiny_model_learns_pennfudan_on_cpu():
    torch.manual_seed(0)
    kw = dict(split="train", min_size=160, max_size=256, subset=8, subset_seed=0)
    train_set = data.PennFudanDataset(PENNFUDAN, train=True, **kw)
    eval_set = data.PennFudanDataset(PENNFUDAN, train=False, **kw)
    assert train_set.image_ids == eval_set.image_ids

    model = build_model("tiny", num_classes=train_set.num_classes)
    device = torch.device("cpu")
    before = evaluate.evaluate(model, eval_set, device, workers=0)

    train_briefly(model, train_set, iters=300, lr_step=240)

    after = evaluate.evaluate(model, eval_set, device, workers=0)
    print(f"box AP50 before {before['bbox/AP50']:.3f}, after {after['bbox/AP50']:.3f}; "
          f"mask AP50 after {after['segm/AP50']:.3f}")
    assert before["bbox/AP50"] < 0.1
    assert after["bbox/AP50"] >= 0.7
    assert after["segm/AP50"] >= 0.6  # measured 0.84-0.92 across versions of this code (README)
