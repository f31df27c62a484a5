"""checkpoint.py: a file that cannot serve as --weights, --pretrained or --resume is a one-line error naming it."""
import argparse
import os
import shutil

import pytest
import torch

import checkpoint
from model import build_model


@pytest.fixture(scope="module")
def tiny():
    return build_model("tiny", num_classes=3)


@pytest.mark.parametrize("content, held", [([1, 2], "list"), (torch.zeros(3), "Tensor"), ({"a": 1}, "dict")])
@pytest.mark.parametrize("load", ["weights", "pretrained"])
def test_a_file_that_is_no_state_dict_is_refused(tiny, tmp_path, content, held, load):
    path = tmp_path / "file.pth"
    torch.save(content, path)
    with pytest.raises(SystemExit, match=f"--{load} .*file.pth holds a {held}, not a state dict"):
        if load == "weights":
            checkpoint.load_weights(tiny, str(path))
        else:
            checkpoint.load_pretrained(tiny.backbone, str(path))


def test_weights_that_fit_no_backbone_tensor_are_refused(tiny, tmp_path, capsys):
    # Another preset's checkpoint: the backbone tensors differ, while a few head tensors (here: all) still fit.
    state = {k: torch.zeros(1) if k.startswith("backbone.") else v for k, v in tiny.state_dict().items()}
    torch.save({"model": state}, tmp_path / "other.pth")
    with pytest.raises(SystemExit, match=r"--weights .*other\.pth fits none of this model's backbone tensors"):
        checkpoint.load_weights(tiny, str(tmp_path / "other.pth"))
    torch.save({"features.0.weight": torch.zeros(8, 3, 3, 3)}, tmp_path / "vgg.pth")    # no name in common
    with pytest.raises(SystemExit, match="fits none of this model's backbone tensors"):
        checkpoint.load_weights(tiny, str(tmp_path / "vgg.pth"))
    # The same preset loads, with a new keypoint head left at its init.
    torch.save({"model": tiny.state_dict()}, tmp_path / "tiny.pth")
    keypoint_model = build_model("tiny_kp", num_classes=3, num_keypoints=17)
    checkpoint.load_weights(keypoint_model, str(tmp_path / "tiny.pth"))
    assert "0 unexpected keys" in capsys.readouterr().out
    assert torch.equal(keypoint_model.backbone.conv1.weight, tiny.backbone.conv1.weight)


def test_pretrained_refuses_a_train_py_checkpoint_and_foreign_backbones(tiny, tmp_path):
    # A train.py checkpoint holds numpy RNG states, which a weights-only load refuses to unpickle.
    torch.save({"model": tiny.state_dict(), "rng": [checkpoint.rng_state()]}, tmp_path / "model_0000001.pth")
    with pytest.raises(SystemExit, match=r"not a plain state dict of tensors \(a train.py checkpoint\? use --weights"):
        checkpoint.load_pretrained(tiny.backbone, str(tmp_path / "model_0000001.pth"))
    torch.save({"features.0.weight": torch.zeros(8, 3, 3, 3)}, tmp_path / "vgg.pth")
    with pytest.raises(SystemExit, match=r"vgg\.pth has no tensor named as this backbone's"):
        checkpoint.load_pretrained(tiny.backbone, str(tmp_path / "vgg.pth"))
    torch.save({"conv1.weight": torch.zeros(1)}, tmp_path / "wide.pth")
    with pytest.raises(SystemExit, match=r"wide\.pth does not fit this backbone: size mismatch for conv1.weight"):
        checkpoint.load_pretrained(tiny.backbone, str(tmp_path / "wide.pth"))


@pytest.mark.parametrize("run_args", [{"init": "scratch"}, "tiny"])
def test_resume_refuses_a_checkpoint_without_its_preset(tmp_path, run_args):
    """An old or foreign file: its "args" lacks "preset" or is not a dict of flags at all."""
    torch.save({"model": {}, "optimizer": {}, "args": run_args, "rng": [], "iteration": 1, "seen": {}},
               tmp_path / "old.pth")
    with pytest.raises(SystemExit, match=r"old\.pth has no args\.preset: not a model_\*\.pth written by train\.py"):
        checkpoint.load_for_resume(str(tmp_path / "old.pth"), argparse.Namespace(preset="tiny"))


def test_latest_is_the_highest_iteration(tmp_path):
    for it in (10, 500, 1000):
        (tmp_path / f"model_{it:07d}.pth").touch()
    (tmp_path / "model_0002000.pth.tmp").touch()  # a checkpoint being written is not one yet
    assert checkpoint.latest(str(tmp_path)) == str(tmp_path / "model_0001000.pth")


@pytest.mark.parametrize("flag, value", [("lr", 0.04), ("batch_size", 8), ("seed", 3), ("min_size", 600),
                                         ("max_size", 1000), ("warmup_iters", 0), ("lr_steps", [5]),
                                         ("weight_decay", 0.0), ("amp", "bf16"), ("norm", "syncbn"),
                                         ("train_subset", 10), ("data", "PennFudanPed")])
def test_resume_refuses_a_changed_trajectory_flag(tmp_path, flag, value):
    import train
    args = train.resolve(train.get_args(["--device", "cpu"]))
    path = tmp_path / "model_0000001.pth"
    torch.save({"model": {}, "optimizer": {}, "rng": [], "iteration": 1, "seen": {}, "args": dict(vars(args))}, path)
    assert checkpoint.load_for_resume(str(path), args)["args"]["lr"] == args.lr  # the run's own flags: accepted
    setattr(args, flag, value)
    with pytest.raises(SystemExit, match=f"--{flag.replace('_', '-')} "):
        checkpoint.load_for_resume(str(path), args)


def test_find_resume_refuses_another_process_count_and_a_held_folder_but_not_a_dry_run(tmp_path):
    import train
    args = train.resolve(train.get_args(["--device", "cpu", "--output-dir", str(tmp_path)]))
    state = {"model": {}, "optimizer": {}, "rng": [checkpoint.rng_state()] * 2, "iteration": 1, "seen": {},
             "args": dict(vars(args))}
    torch.save(state, tmp_path / "model_0000001.pth")                         # written by 2 processes
    args.resume = "auto"
    with pytest.raises(SystemExit, match=r"model_0000001\.pth was written by 2 process\(es\); resume it with as many"):
        checkpoint.find_resume(args)
    args.resume = None                                                        # a new run where a run is
    with pytest.raises(SystemExit, match="already holds a run"):
        checkpoint.find_resume(args)
    args.dry_run = True                                                       # writes nothing: not refused
    assert checkpoint.find_resume(args) == (None, None)


def test_resume_refuses_rng_states_train_py_did_not_write(tmp_path):
    args = argparse.Namespace(preset="tiny")
    torch.save({"model": {}, "optimizer": {}, "args": {"preset": "tiny"}, "rng": 5, "iteration": 1, "seen": {}},
               tmp_path / "edited.pth")
    with pytest.raises(SystemExit, match=r"edited\.pth has RNG states that are not train.py's"):
        checkpoint.load_for_resume(str(tmp_path / "edited.pth"), args)


def test_latest_is_the_highest_iteration_among_train_pys_own_names(tmp_path):
    for name in ("model_9999999.pth", "model_10000000.pth", "model_0000005.pth", "model_best.pth",
                 "model_final.pth", "model_0000007.pth.tmp", "model_12.pth"):
        (tmp_path / name).write_bytes(b"")
    assert checkpoint.latest(str(tmp_path)) == str(tmp_path / "model_10000000.pth")  # not the string-wise largest
    assert [i for i, _ in checkpoint.checkpoints(str(tmp_path))] == [10000000, 9999999, 5]
    assert checkpoint.latest(str(tmp_path / "missing")) is None


def test_a_failed_write_leaves_the_previous_file_and_no_partial_one(tmp_path, monkeypatch):
    path = tmp_path / "model_0000002.pth"
    torch.save({"iteration": 1}, path)  # what a previous save left at this path

    def full_disk(obj, f):  # torch's zip writer reports a full disk as a RuntimeError, after writing part of it
        with open(f, "wb") as partial:
            partial.write(b"PK\x03\x04 partial")
        raise RuntimeError("[enforce fail at inline_container.cc:603] . PytorchStreamWriter failed writing file "
                           "data/0: file write failed")

    monkeypatch.setattr(checkpoint.torch, "save", full_disk)
    monkeypatch.setattr(checkpoint.shutil, "disk_usage", lambda p: shutil._ntuple_diskusage(100, 100, 0))
    with pytest.raises(SystemExit, match=f"cannot write checkpoint {path}: no space left on device"):
        checkpoint.atomic_save({"iteration": 2}, str(path), "checkpoint")
    assert sorted(os.listdir(tmp_path)) == ["model_0000002.pth"]
    assert torch.load(path)["iteration"] == 1
    # with space left, the write error itself is named
    monkeypatch.setattr(checkpoint.shutil, "disk_usage", lambda p: shutil._ntuple_diskusage(2 ** 40, 0, 2 ** 40))
    with pytest.raises(SystemExit, match="cannot write --save-backbone .*: .*file write failed; nothing partial"):
        checkpoint.atomic_save({}, str(tmp_path / "backbone.pth"), "--save-backbone")
    assert sorted(os.listdir(tmp_path)) == ["model_0000002.pth"]


def test_data_identity_keeps_the_names_predict_py_draws_and_resume_compares_classes_and_digest(tmp_path):
    from shapes import make_shapes
    import data
    make_shapes(str(tmp_path), num_train=2, num_val=1, seed=0)
    dataset = data.CocoDataset(str(tmp_path / "annotations" / "instances_train.json"), str(tmp_path / "train"))
    identity = checkpoint.data_identity(dataset)
    assert identity["classes"] == [[1, "circle"], [3, "square"], [7, "triangle"]]
    assert identity["keypoint_names"] == [] and identity["keypoint_skeleton"] == []
    # an older checkpoint's record (no keypoint entries) or other keypoint names: the same data for --resume
    older = {"data": {"classes": identity["classes"], "digest": identity["digest"]}}
    checkpoint.refuse_other_data("old.pth", older, dict(identity, keypoint_names=["nose"]))
    with pytest.raises(SystemExit, match="the training data changed since checkpoint old.pth"):
        checkpoint.refuse_other_data("old.pth", older, dict(identity, digest="0"))
