"""The training loop: schedule math, weight decay groups, exact resume, refusals and the non-finite-loss stop."""
import json
import math
import os
import re
import shutil

import pytest
import torch
from pycocotools.coco import COCO

import data
import evaluate
import checkpoint
import schedule
import train
from shapes import make_shapes


def test_schedule_at_batch_16():
    # Rethinking Sec. 4: 2x = 180k iterations, LR drops at the last 60k and 20k; 6x drops at 480k and 520k.
    assert schedule.schedule(2, 16) == (180_000, [120_000, 160_000])
    assert schedule.schedule(6, 16) == (540_000, [480_000, 520_000])
    assert schedule.schedule(2.5, 16) == (225_000, [165_000, 205_000])
    # Up to 2x, Detectron's 1x proportions: 60k and 80k of 90k (the last-60k rule would give 30k and 70k).
    assert schedule.schedule(1, 16) == (90_000, [60_000, 80_000])
    assert schedule.schedule(0.5, 16) == (45_000, [30_000, 40_000])


def test_schedule_scales_with_batch():
    # Batch 2 sees 8x fewer images per iteration, so every count is 8x larger (linear scaling rule).
    assert schedule.schedule(2, 2) == (1_440_000, [960_000, 1_280_000])
    assert schedule.schedule(6, 2) == (4_320_000, [3_840_000, 4_160_000])


def test_lr_warmup_and_steps():
    lr = lambda it: schedule.lr_at(it, 0.02, steps=(100, 200), gamma=0.1, warmup_iters=50, warmup_factor=1 / 3)
    assert lr(0) == pytest.approx(0.02 / 3)
    assert lr(25) == pytest.approx(0.02 * (1 / 3 * 0.5 + 0.5))       # half-way along the linear ramp
    assert lr(50) == pytest.approx(0.02)
    assert lr(99) == pytest.approx(0.02)
    assert lr(100) == pytest.approx(0.002)
    assert lr(200) == pytest.approx(0.0002)


@pytest.mark.parametrize("norm, layer", [("gn", "GroupNorm"), ("syncbn", "SyncBatchNorm"), ("bn", "BatchNorm2d")])
def test_no_weight_decay_on_norm_parameters(norm, layer):
    from model import build_model
    model = build_model("tiny", num_classes=3, norm=norm, fpn_norm=norm, head_norm=norm)
    decay, no_decay = train.param_groups(model, 1e-4)
    norm_params = {id(p) for m in model.modules() if type(m).__name__ == layer for p in m.parameters()}
    assert norm_params and {id(p) for p in no_decay["params"]} == norm_params
    assert decay["weight_decay"] == 1e-4 and no_decay["weight_decay"] == 0.0
    assert len(decay["params"]) + len(no_decay["params"]) == len([p for p in model.parameters() if p.requires_grad])


def test_scratch_with_frozen_bn_is_refused():
    with pytest.raises(SystemExit, match="frozen"):
        train.resolve(train.get_args(["--norm", "frozen_bn", "--device", "cpu"]))


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    root = tmp_path_factory.mktemp("shapes")
    make_shapes(str(root), num_train=8, num_val=4, seed=0)
    return root


def run_args(shapes, out, *extra):
    return ["--train-ann", str(shapes / "annotations" / "instances_train.json"),
            "--train-images", str(shapes / "train"),
            "--val-ann", str(shapes / "annotations" / "instances_val.json"), "--val-images", str(shapes / "val"),
            "--data", "custom", "--preset", "tiny", "--device", "cpu", "--batch-size", "2", "--min-size", "96",
            "--workers", "0", "--log-period", "1", "--warmup-iters", "2", "--output-dir", str(out), *extra]


def read_rows(path, evaluation=False):
    """metrics.jsonl's training rows (with a "loss"), or its evaluation rows."""
    with open(path) as f:
        return [r for r in map(json.loads, f) if ("loss" in r) != evaluation]


def test_resume_is_exact(shapes, tmp_path):
    # The full run evaluates at the checkpoint's iteration, after saving it. The resumed folder holds that
    # checkpoint without the evaluation's row, as if the run had been killed while evaluating: the resumed run
    # evaluates iteration 3 first, and must still take the same random draws as the full run.
    full, resumed = tmp_path / "full", tmp_path / "resumed"
    train.main(run_args(shapes, full, "--max-iters", "6", "--ckpt-period", "3", "--eval-period", "3"))
    resumed.mkdir()
    shutil.copy(full / "model_0000003.pth", resumed / "model_0000003.pth")
    train.main(run_args(shapes, resumed, "--max-iters", "6", "--ckpt-period", "3", "--eval-period", "3",
                        "--resume", "auto"))
    a, b = read_rows(full / "metrics.jsonl"), read_rows(resumed / "metrics.jsonl")
    assert [r["iter"] for r in b] == [4, 5, 6]
    evals_a, evals_b = read_rows(full / "metrics.jsonl", True), read_rows(resumed / "metrics.jsonl", True)
    assert [r["iter"] for r in evals_b] == [3, 6]
    assert evals_a == evals_b  # the same checkpoints evaluated alike, and the same model at iteration 6
    for ra, rb in zip(a[3:], b):
        for k in ra:
            if k.startswith("loss") or k.startswith("seen_") or k == "lr":
                assert ra[k] == rb[k], (ra["iter"], k)
    sa = torch.load(full / "model_0000006.pth", weights_only=False)["model"]
    sb = torch.load(resumed / "model_0000006.pth", weights_only=False)["model"]
    assert all(torch.equal(sa[k], sb[k]) for k in sa)


def test_resuming_an_ended_run_writes_only_its_missing_final_evaluation(shapes, tmp_path):
    train.main(run_args(shapes, tmp_path, "--max-iters", "2"))
    rows = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert "loss" not in json.loads(rows[-1])  # the final evaluation; remove it, as a run killed during COCOeval
    (tmp_path / "metrics.jsonl").write_text("\n".join(rows[:-1]) + "\n")
    train.main(run_args(shapes, tmp_path, "--max-iters", "2", "--resume", "auto"))
    assert (tmp_path / "metrics.jsonl").read_text().splitlines() == rows  # written again, and nothing else
    train.main(run_args(shapes, tmp_path, "--max-iters", "2", "--resume", "auto"))
    assert (tmp_path / "metrics.jsonl").read_text().splitlines() == rows  # present: not evaluated a second time


def test_non_finite_loss_stops_with_the_iteration_and_term(shapes, tmp_path):
    with pytest.raises(SystemExit, match=r"non-finite loss at iteration \d+: loss_") as stop:
        train.main(run_args(shapes, tmp_path, "--max-iters", "30", "--lr", "1e6", "--warmup-iters", "0",
                            "--ckpt-period", "1", "--no-eval"))
    # The last good checkpoint is the one before the iteration whose weights gave the non-finite loss.
    it = int(re.search(r"iteration (\d+)", str(stop.value)).group(1))
    assert it >= 1 and (tmp_path / f"model_{it:07d}.pth").exists()
    assert str(stop.value).endswith(f"the last good checkpoint is {tmp_path / f'model_{it - 1:07d}.pth'}")
    # Every checkpoint on disk is complete and loadable (written atomically); no temp file is left over.
    names = os.listdir(tmp_path)
    assert not [n for n in names if n.endswith(".tmp")]
    for n in names:
        if n.endswith(".pth"):
            torch.load(tmp_path / n, weights_only=False)


def test_checkpoint_from_another_preset_is_refused(shapes, tmp_path):
    train.main(run_args(shapes, tmp_path, "--max-iters", "1", "--no-eval"))
    args = run_args(shapes, tmp_path / "other", "--max-iters", "2", "--no-eval",
                    "--resume", str(tmp_path / "model_0000001.pth"))
    args[args.index("tiny")] = "r50_fpn_gn"
    with pytest.raises(SystemExit, match="preset 'tiny'"):
        train.main(args)


@pytest.mark.parametrize("flags, message", [
    (["--schedule", "2x", "--max-iters", "10"], "--schedule sets"),
    (["--pretrained", "backbone.pth"], "--pretrained is read only with --init imagenet"),
    (["--train-scales", "800,640"], "0 < LO <= HI"),
    (["--schedule", "0x"], "expected Nx with N > 0"),
    (["--schedule", "6"], "expected Nx with N > 0"),
    (["--warmup-iters", "-1"], "--warmup-iters"),
    (["--ckpt-period", "0"], "positive integer"),
    (["--val-images", "val"], "--val-images needs --val-ann"),
    (["--preset", "tiny_kp", "--cascade"], "no keypoints"),
])
def test_flags_that_make_no_sense_are_refused(flags, message, capsys):
    with pytest.raises(SystemExit) as e:
        train.resolve(train.get_args(["--device", "cpu", *flags]))
    assert message in str(e.value) + capsys.readouterr().err  # resolve's sys.exit, or argparse's usage error


def test_resume_with_other_trajectory_flags_is_refused(shapes, tmp_path):
    train.main(run_args(shapes, tmp_path, "--max-iters", "1", "--no-eval"))
    args = run_args(shapes, tmp_path, "--max-iters", "2", "--no-eval", "--resume", "auto", "--seed", "5")
    with pytest.raises(SystemExit, match=r"--seed 0 -> 5.*--weights"):
        train.main(args)
    assert json.loads((tmp_path / "args.json").read_text())["seed"] == 0  # the run's record is left as it was


@pytest.mark.parametrize("flag", ["--resume", "--weights", "--checkpoint"])
def test_a_file_that_is_not_a_checkpoint_is_a_one_line_error(shapes, tmp_path, flag):
    bad = tmp_path / "notes.pth"
    bad.write_text("not a checkpoint\n")
    with pytest.raises(SystemExit) as e:
        if flag == "--checkpoint":
            evaluate.main(["--checkpoint", str(bad), "--device", "cpu"])
        else:
            train.main(run_args(shapes, tmp_path / "run", "--max-iters", "1", "--no-eval", flag, str(bad)))
    message = str(e.value)
    assert message.startswith("error:") and "notes.pth is not a PyTorch checkpoint" in message and "\n" not in message


def test_bad_validation_data_found_while_evaluating_is_a_one_line_error(shapes, tmp_path):
    val = json.loads((shapes / "annotations" / "instances_val.json").read_text())
    val["images"][0]["height"] += 1  # found only when the image is read, in a loader worker
    bad = tmp_path / "val.json"
    bad.write_text(json.dumps(val))
    args = run_args(shapes, tmp_path / "run", "--max-iters", "1", "--workers", "1")
    args[args.index("--val-ann") + 1] = str(bad)
    with pytest.raises(SystemExit) as e:
        train.main(args)
    message = str(e.value)
    assert message.startswith("error:") and f"image id {val['images'][0]['id']} says" in message
    assert "\n" not in message


def test_evaluate_cli_scores_a_training_checkpoint(shapes, tmp_path):
    train.main(run_args(shapes, tmp_path, "--max-iters", "2", "--no-eval"))
    results = tmp_path / "results.json"
    metrics = evaluate.main(["--checkpoint", str(tmp_path / "model_0000002.pth"), "--device", "cpu",
                             "--workers", "0", "--results", str(results)])
    assert set(metrics) == {f"{t}/{m}" for t in ("bbox", "segm") for m in evaluate.METRICS}
    written = json.loads(results.read_text())
    assert written and {r["category_id"] for r in written} <= {1, 3, 7}  # the json's own (non-contiguous) ids
    # the metrics are COCOeval's on the written results and a ground truth read afresh from the json
    assert evaluate.coco_eval(COCO(str(shapes / "annotations" / "instances_val.json")), written) == metrics


@pytest.mark.parametrize("flag", ["--train-ann", "--val-ann"])
def test_missing_annotation_file_is_a_one_line_error(shapes, tmp_path, flag):
    args = run_args(shapes, tmp_path, "--max-iters", "1", "--no-eval")
    args[args.index(flag) + 1] = str(tmp_path / "missing.json")
    with pytest.raises(SystemExit) as e:
        train.main(args)
    message = str(e.value)
    assert message.startswith("error:") and "missing.json" in message and "\n" not in message


def test_dry_run_prints_the_plan_and_trains_nothing(shapes, tmp_path, capsys):
    args = run_args(shapes, tmp_path, "--schedule", "2x", "--dry-run")
    i = args.index("--warmup-iters")
    del args[i:i + 2]  # the default warm-up
    train.main(args)
    out = capsys.readouterr().out
    assert "1440000 iterations" in out and "[960000, 1280000]" in out        # 2x at batch 2
    assert "warm-up 4000 " in out  # Detectron's 500 at batch 16 cover 8000 images: 4000 iterations at batch 2
    assert "8 training images" in out and "norm gn" in out
    assert f"output {tmp_path}: a new run" in out and "shorter side 96, longer side at most 533" in out
    assert "flags:" not in out and "--weight-decay" not in out  # every flag is in args.json, not on the console
    assert not [n for n in os.listdir(tmp_path) if n.endswith((".pth", ".json", ".jsonl"))]  # args.json neither
    assert "related work" not in out  # the paper's recipe
    train.main(run_args(shapes, tmp_path, "--dry-run", "--cutmix", "--attention", "cbam"))
    first = capsys.readouterr().out.splitlines()[0]
    assert first.endswith("related work: --cutmix --attention cbam")  # a departure from the recipe is said at once


def test_the_console_off_a_terminal_and_the_eval_log(shapes, tmp_path, capsys):
    """Off a terminal (pytest captures the output): plain progress lines every --log-period iterations, one line per
    evaluation, and the COCOeval tables in eval_log.txt, appended to on resume; the end names the files and the next
    commands."""
    train.main(run_args(shapes, tmp_path, "--max-iters", "4", "--log-period", "2", "--eval-period", "2",
                        "--ckpt-period", "2"))
    out, err = capsys.readouterr()
    assert "\x1b" not in out + err and "\r" not in out + err  # no bar, no escape codes
    lines = out.splitlines()
    assert [line.split("  ")[0] for line in lines if line.startswith("iter ") and "/" in line] == ["iter 2/4",
                                                                                                   "iter 4/4"]
    assert re.search(r"^iter 2/4  loss \d+\.\d{3} \(rpn_cls \S+ rpn_box \S+ cls \S+ box \S+ mask \S+\)  lr \S+  "
                     r"eta \S+$", out, re.MULTILINE)
    assert re.search(r"^iter 2: box AP \d+\.\d \| mask AP \d+\.\d$", out, re.MULTILINE)
    assert not [line for line in lines if line.startswith(" Average")]  # the tables went into the log
    log = (tmp_path / "eval_log.txt").read_text()
    assert log.count("=== iteration") == 2 and log.count(" Average Precision") == 2 * 12
    assert f"wrote {tmp_path / 'model_0000004.pth'} (the last checkpoint)" in out
    assert f"python predict.py --checkpoint {tmp_path / 'model_0000004.pth'} --input IMAGE_OR_DIR" in out
    assert f"python plot.py losses {tmp_path}" in out
    # resumed from iteration 2 (a copy of the run's folder as it was then): the log grows by the evaluation at 4
    resumed = tmp_path / "resumed"
    resumed.mkdir()
    shutil.copy(tmp_path / "model_0000002.pth", resumed)
    rows = (tmp_path / "metrics.jsonl").read_text().splitlines(keepends=True)
    (resumed / "metrics.jsonl").write_text("".join(rows[:2]))  # the training row and the evaluation of iteration 2
    (resumed / "eval_log.txt").write_text(log[:log.index("=== iteration 4")])
    train.main(run_args(shapes, resumed, "--max-iters", "4", "--log-period", "2", "--eval-period", "2",
                        "--ckpt-period", "2", "--resume", "auto"))
    assert (resumed / "eval_log.txt").read_text() == log
    assert "iter 4/4" in capsys.readouterr().out


def test_coco_tables_on_the_console_with_the_flag(shapes, tmp_path, capsys):
    train.main(run_args(shapes, tmp_path, "--max-iters", "1", "--coco-tables"))
    out = capsys.readouterr().out
    assert len([line for line in out.splitlines() if line.startswith(" Average")]) == 24
    assert "=== iteration 1 ===" in out and not (tmp_path / "eval_log.txt").exists()


def test_bf16_subset_and_lr_flags_reach_the_run(shapes, tmp_path, capsys):
    train.main(run_args(shapes, tmp_path, "--max-iters", "2", "--no-eval", "--amp", "bf16", "--train-subset", "3",
                        "--lr", "0.01", "--lr-steps", "1", "--lr-gamma", "0.5", "--warmup-iters", "0"))
    assert "3 training images" in capsys.readouterr().out  # of the 8
    rows = read_rows(tmp_path / "metrics.jsonl")
    assert [r["lr"] for r in rows] == [0.01, 0.005]  # the drop at iteration 1, by --lr-gamma
    assert all(math.isfinite(r[k]) for r in rows for k in r if k.startswith("loss"))


def test_samples_seen_are_counted(shapes, tmp_path):
    # Rethinking Sec. 3.2: images, instances and pixels seen. Recount them from the same batches.
    train.main(run_args(shapes, tmp_path, "--max-iters", "3", "--no-eval"))
    train_set = data.build_dataset("custom", "train", train=True, min_size=96, max_size=1333,
                                   ann=str(shapes / "annotations" / "instances_train.json"),
                                   images=str(shapes / "train"))
    batches = data.make_train_loader(train_set, batch_size=2, seed=0, workers=0)
    images = instances = pixels = 0
    for _ in range(3):
        _, sizes, targets = next(batches)
        images += len(targets)
        instances += sum(len(t["boxes"]) for t in targets)
        pixels += sum(h * w for h, w in sizes)
    last = read_rows(tmp_path / "metrics.jsonl")[-1]
    assert (last["seen_images"], last["seen_instances"], last["seen_pixels"]) == (images, instances, pixels)
    assert images == 6 and instances > 0


def test_train_scales_are_recorded(shapes, tmp_path):
    train.main(run_args(shapes, tmp_path, "--train-scales", "64,96", "--max-iters", "1", "--no-eval"))
    args = json.loads((tmp_path / "args.json").read_text())
    assert args["train_scales"] == [64, 96] and args["min_size"] == 96


def test_saved_backbone_loads_as_pretrained_weights(shapes, tmp_path, capsys):
    backbone = tmp_path / "backbone.pth"
    train.main(run_args(shapes, tmp_path / "a", "--max-iters", "1", "--no-eval", "--save-backbone", str(backbone)))
    assert set(torch.load(backbone)) >= {"conv1.weight", "layer4.0.conv3.weight"}   # torchvision names
    train.main(run_args(shapes, tmp_path / "b", "--max-iters", "1", "--no-eval", "--init", "imagenet",
                        "--pretrained", str(backbone)))
    assert "0 missing keys" in capsys.readouterr().out


def test_torchvision_imagenet_checkpoint_loads_into_the_backbone(tmp_path, capsys):
    tv = pytest.importorskip("torchvision")
    from model import build_model
    path = tmp_path / "resnet50.pth"
    reference = tv.models.resnet50()
    torch.save(reference.state_dict(), path)                  # a torchvision ImageNet-format file, fc included
    model = build_model("r50_fpn_syncbn", num_classes=3)
    checkpoint.load_pretrained(model.backbone, str(path))
    out = capsys.readouterr().out
    assert "0 missing keys" in out and "0 unexpected keys" in out   # fc.* is expected and not reported
    assert torch.equal(model.backbone.layer3[2].conv2.weight, reference.layer3[2].conv2.weight)
    assert torch.equal(model.backbone.bn1.running_var, reference.bn1.running_var)
    assert "BatchNorm network" not in out
    checkpoint.load_pretrained(build_model("r50_fpn_gn", num_classes=3).backbone, str(path))
    assert "is a BatchNorm network; its BN scales and shifts went into" in capsys.readouterr().out


@pytest.mark.parametrize("flag", ["--channels-last", "--compile"])
def test_speed_flags_leave_the_losses_unchanged(shapes, tmp_path, monkeypatch, flag):
    """NHWC memory format and torch.compile (of the backbone and FPN) change how, not what, is computed.
    The compile test traces with TorchDynamo + AOTAutograd but skips Inductor's C++ code generation ("aot_eager"),
    which is slow to compile on a CPU."""
    compile_module, compiled = torch.nn.Module.compile, []
    monkeypatch.setattr(torch.nn.Module, "compile",
                        lambda self: compiled.append(type(self).__name__) or compile_module(self, backend="aot_eager"))
    torch._dynamo.reset()
    train.main(run_args(shapes, tmp_path / "plain", "--max-iters", "2", "--no-eval"))
    train.main(run_args(shapes, tmp_path / "fast", "--max-iters", "2", "--no-eval", flag))
    plain, fast = read_rows(tmp_path / "plain" / "metrics.jsonl"), read_rows(tmp_path / "fast" / "metrics.jsonl")
    for a, b in zip(plain, fast, strict=True):
        for k in a:
            if k.startswith("loss"):
                assert b[k] == pytest.approx(a[k], rel=1e-3, abs=1e-5), (a["iter"], k)
    # compiled or not, the checkpoint has the plain model's parameter names
    fast_state = torch.load(tmp_path / "fast" / "model_0000002.pth", weights_only=False)["model"]
    assert fast_state.keys() == torch.load(tmp_path / "plain" / "model_0000002.pth", weights_only=False)["model"].keys()
    # and the flag took effect
    if flag == "--compile":
        assert compiled == ["ResNet", "FPN"]
    else:
        assert fast_state["backbone.conv1.weight"].is_contiguous(memory_format=torch.channels_last)


def test_an_output_dir_holding_a_run_is_not_overwritten(shapes, tmp_path):
    train.main(run_args(shapes, tmp_path / "a", "--max-iters", "1", "--no-eval"))
    train.main(run_args(shapes, tmp_path / "b", "--max-iters", "1", "--no-eval"))
    files = {path: path.read_bytes() for path in (tmp_path / "b").iterdir()}
    with pytest.raises(SystemExit, match="already holds a run.*continue it with --resume auto"):  # a new run
        train.main(run_args(shapes, tmp_path / "b", "--max-iters", "1", "--no-eval", "--seed", "3"))
    with pytest.raises(SystemExit, match="already holds a run"):  # another run's checkpoint, continued here
        train.main(run_args(shapes, tmp_path / "b", "--max-iters", "2", "--no-eval",
                            "--resume", str(tmp_path / "a" / "model_0000001.pth")))
    (tmp_path / "b" / "model_0000001.pth").unlink()
    del files[tmp_path / "b" / "model_0000001.pth"]
    with pytest.raises(SystemExit, match="already holds a run.*it has no checkpoint to continue from"):
        train.main(run_args(shapes, tmp_path / "b", "--max-iters", "1", "--no-eval", "--resume", "auto",
                            "--seed", "3"))  # another run, in a folder whose run has no checkpoint
    assert {path: path.read_bytes() for path in (tmp_path / "b").iterdir()} == files  # args.json, metrics.jsonl
    # The same run, stopped before its first checkpoint (here: the checkpoint removed), starts anew with --resume auto
    # and writes the same rows again.
    rows = read_rows(tmp_path / "b" / "metrics.jsonl")
    train.main(run_args(shapes, tmp_path / "b", "--max-iters", "1", "--no-eval", "--resume", "auto"))
    again = read_rows(tmp_path / "b" / "metrics.jsonl")
    assert [{k: v for k, v in r.items() if k.startswith("loss")} for r in again] == \
        [{k: v for k, v in r.items() if k.startswith("loss")} for r in rows]
    assert (tmp_path / "b" / "model_0000001.pth").exists()
    # Another run's checkpoint continued in a new folder is fine.
    train.main(run_args(shapes, tmp_path / "c", "--max-iters", "2", "--no-eval",
                        "--resume", str(tmp_path / "a" / "model_0000001.pth")))
    assert (tmp_path / "c" / "model_0000002.pth").exists()


def test_default_output_dir_names_the_preset_and_data(tmp_path):
    args = train.resolve(train.get_args(["--device", "cpu", "--data", str(tmp_path / "PennFudanPed")]))
    assert args.output_dir == os.path.join("runs", "tiny-PennFudanPed")
    assert train.resolve(train.get_args(["--device", "cpu"])).output_dir == "runs/demo"


def test_resume_drops_a_half_written_metrics_row(shapes, tmp_path):
    train.main(run_args(shapes, tmp_path, "--max-iters", "1", "--no-eval"))
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"iter": 2, "lo')  # the run was killed while writing this row
    train.main(run_args(shapes, tmp_path, "--max-iters", "2", "--no-eval", "--resume", "auto"))
    assert [row["iter"] for row in read_rows(tmp_path / "metrics.jsonl")] == [1, 2]


@pytest.mark.parametrize("flag, value, message", [
    ("--batch-size", "0", "expected a positive integer, got '0'"),
    ("--min-size", "-5", "expected a positive integer, got '-5'"),
    ("--lr", "nan", "expected a positive number, got 'nan'"),
    ("--eval-period", "-1", "expected a non-negative integer, got '-1'"),
    ("--workers", "-1", "expected a non-negative integer, got '-1'"),
    ("--keypoint-sigmas", "0.1,0", "expected a positive number, got '0'"),
    ("--schedule", "inf", "expected Nx with N > 0"),
    ("--seed", str(2 ** 32), "expected a seed below 2**32"),  # numpy's limit
    ("--subset-seed", "9" * 300, "expected a seed below 2**32"),
    ("--device", "mps", "expected cpu, cuda or cuda:N, got 'mps'"),  # a device torch knows, this code does not run on
    ("--device", "meta", "expected cpu, cuda or cuda:N, got 'meta'"),
    ("--min-size", "100000000", "expected at most 10000, got '100000000'"),  # memory would run out, not a message
    ("--output-dir", "", "expected a folder, got an empty path"),
])
def test_bad_flag_values_are_usage_errors(flag, value, message, capsys):
    with pytest.raises(SystemExit):
        train.get_args([flag, value])
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert f"argument {flag}: {message}" in err


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a CUDA GPU")
def test_cuda_without_a_gpu_is_a_usage_error(capsys):
    with pytest.raises(SystemExit):
        train.get_args(["--device", "cuda"])
    assert "torch finds no CUDA GPU on this machine; use --device cpu" in capsys.readouterr().err


def test_resolved_defaults_follow_the_paper_and_the_effective_batch(tmp_path):
    # 4 processes x 2 images = batch 8: LR 0.02 x 8 / 16, the 1x schedule and Detectron's 500-iteration warm-up
    # both scaled by 16 / 8.
    a = train.resolve(train.get_args(["--device", "cpu", "--data", str(tmp_path / "coco"), "--batch-size", "2"]),
                      world_size=4)
    assert a.lr == pytest.approx(0.01) and a.batch_size == 2
    assert (a.max_iters, a.lr_steps, a.warmup_iters) == (180_000, [120_000, 160_000], 1000)
    assert (a.min_size, a.max_size) == (320, 533)  # the tiny preset's default on CPU: smaller images
    # On GPUs the default batch is 16 images in all: 2 per process on 8 processes, LR 0.02
    args = train.get_args(["--data", str(tmp_path / "coco")])
    args.device = "cuda"
    a = train.resolve(args, world_size=8)
    assert (a.batch_size, a.lr, a.max_iters, a.preset, a.min_size, a.max_size) == (2, 0.02, 90_000, "r50_fpn_gn",
                                                                                 800, 1333)
    # The CPU demo: 400 iterations, one LR drop at 80%, a 50-iteration warm-up, 128-pixel images
    a = train.resolve(train.get_args(["--device", "cpu"]))
    assert (a.max_iters, a.lr_steps, a.warmup_iters, a.min_size, a.lr) == (400, [320], 50, 128, 0.02)


def test_infinite_loss_stops_too(shapes, tmp_path, monkeypatch):
    import model
    forward = model.MaskRCNN.forward

    def inf_mask_loss(self, *args, **kwargs):
        out = forward(self, *args, **kwargs)
        if self.training:
            out["loss_mask"] = out["loss_mask"] + math.inf
        return out

    monkeypatch.setattr(model.MaskRCNN, "forward", inf_mask_loss)
    with pytest.raises(SystemExit, match=r"non-finite loss at iteration 0: loss_mask = inf; no checkpoint was written "
                                         r"before it"):
        train.main(run_args(shapes, tmp_path, "--max-iters", "2", "--no-eval"))


def test_plain_ops_is_recorded_and_reaches_the_model(shapes, tmp_path, monkeypatch):
    """--plain-ops sets plain_ops on every module that has the switch, in training and in the model evaluate.py
    rebuilds from the run (unless its own --plain-ops says otherwise)."""
    import model
    switches = lambda detector: [m.plain_ops for m in detector.modules() if hasattr(m, "plain_ops")]
    forward, trained = model.MaskRCNN.forward, []
    monkeypatch.setattr(model.MaskRCNN, "forward",
                        lambda self, *args, **kwargs: trained.append(switches(self)) or forward(self, *args, **kwargs))
    train.main(run_args(shapes, tmp_path, "--max-iters", "1", "--no-eval", "--plain-ops"))
    assert json.loads((tmp_path / "args.json").read_text())["plain_ops"] is True
    assert trained and all(trained[0])
    rebuilt, _ = evaluate.load_run(str(tmp_path / "model_0000001.pth"))
    assert switches(rebuilt) and all(switches(rebuilt))
    fast, _ = evaluate.load_run(str(tmp_path / "model_0000001.pth"), plain_ops=False)
    assert not any(switches(fast))


def test_resume_auto_falls_back_from_a_damaged_checkpoint(shapes, tmp_path, capsys):
    train.main(run_args(shapes, tmp_path, "--max-iters", "2", "--no-eval", "--ckpt-period", "1"))
    (tmp_path / "model_0000002.pth").write_bytes(b"damaged")
    train.main(run_args(shapes, tmp_path, "--max-iters", "3", "--no-eval", "--ckpt-period", "1", "--resume", "auto"))
    out = capsys.readouterr().out
    assert f"warning: checkpoint {tmp_path / 'model_0000002.pth'} is not a PyTorch checkpoint" in out
    assert f"output {tmp_path}: resumes {tmp_path / 'model_0000001.pth'} at iteration 1" in out
    assert torch.load(tmp_path / "model_0000003.pth", weights_only=False)["iteration"] == 3
    edited = torch.load(tmp_path / "model_0000003.pth", weights_only=False)  # a hand-edited file: no count of seen
    del edited["seen"]
    torch.save(dict(edited, iteration="4"), tmp_path / "model_0000004.pth")
    train.main(run_args(shapes, tmp_path, "--max-iters", "4", "--no-eval", "--ckpt-period", "1", "--resume", "auto"))
    out = capsys.readouterr().out
    assert f"warning: checkpoint {tmp_path / 'model_0000004.pth'} has no seen: not a model_*.pth" in out
    assert f"output {tmp_path}: resumes {tmp_path / 'model_0000003.pth'} at iteration 3" in out
    for name in ("model_0000001.pth", "model_0000002.pth", "model_0000003.pth", "model_0000004.pth"):
        (tmp_path / name).write_bytes(b"damaged")
    with pytest.raises(SystemExit, match="none of its checkpoints can be read"):
        train.main(run_args(shapes, tmp_path, "--max-iters", "5", "--no-eval", "--resume", "auto"))


def test_resume_takes_a_path_flag_given_relative_or_absolute(shapes, tmp_path, monkeypatch):
    train.main(run_args(shapes, tmp_path / "run", "--max-iters", "1", "--no-eval"))
    monkeypatch.chdir(shapes)
    args = run_args(shapes, tmp_path / "run", "--max-iters", "2", "--no-eval", "--resume", "auto")
    args[args.index(str(shapes / "train"))] = "train"  # the same folder, relative to the working directory now
    train.main(args)
    assert (tmp_path / "run" / "model_0000002.pth").exists()


def test_train_and_val_jsons_with_other_categories_are_refused(shapes, tmp_path):
    val = json.loads((shapes / "annotations" / "instances_val.json").read_text())
    val["categories"] = [dict(c, name=c["name"] + "-x") for c in val["categories"]]  # the labels would not match
    (tmp_path / "val.json").write_text(json.dumps(val))
    args = run_args(shapes, tmp_path / "run", "--max-iters", "1")
    args[args.index(str(shapes / "annotations" / "instances_val.json"))] = str(tmp_path / "val.json")
    with pytest.raises(SystemExit, match=r"error: the validation json .*val\.json has other categories than the "
                                         r"training json"):
        train.main(args)


def test_resume_with_a_checkpoint_that_does_not_fit_is_a_one_line_error(shapes, tmp_path):
    jsons = {split: json.loads((shapes / "annotations" / f"instances_{split}.json").read_text())
             for split in ("train", "val")}

    def args(*extra):  # the run on copies of the shapes jsons
        a = run_args(shapes, tmp_path / "run", "--max-iters", "1", "--no-eval", *extra)
        for split in jsons:
            (tmp_path / f"{split}.json").write_text(json.dumps(jsons[split]))
            a[a.index(str(shapes / "annotations" / f"instances_{split}.json"))] = str(tmp_path / f"{split}.json")
        return a

    train.main(args())
    for split in jsons:  # both jsons gain a class: the box and mask predictors get another shape
        jsons[split]["categories"].append({"id": 99, "name": "new"})
    with pytest.raises(SystemExit, match=r"model_0000001\.pth was trained on the classes \[\[1, 'circle'\], .*\], "
                                         r"the data now has .*\[99, 'new'\]\]"):
        train.main(args("--resume", "auto"))
    ckpt = torch.load(tmp_path / "run" / "model_0000001.pth", weights_only=False)
    del ckpt["data"]  # a checkpoint written before train.py recorded its data
    torch.save(ckpt, tmp_path / "run" / "model_0000001.pth")
    with pytest.raises(SystemExit, match=r"does not fit this run's model \(did the data's classes change\?\): "
                                         r"size mismatch for"):
        train.main(args("--resume", "auto"))
    def keep_images(n):
        images = jsons["train"]["images"] = jsons["train"]["images"][:n]
        jsons["train"]["annotations"] = [a for a in jsons["train"]["annotations"]
                                         if a["image_id"] in {i["id"] for i in images}]

    for split in jsons:  # the same classes, fewer images under the same path: not the run's data any more
        jsons[split]["categories"].pop()
    keep_images(4)
    train.main(args("--output-dir", str(tmp_path / "run2")))
    keep_images(3)
    with pytest.raises(SystemExit, match=r"the training data changed since checkpoint .*model_0000001\.pth was "
                                         r"written"):
        train.main(args("--output-dir", str(tmp_path / "run2"), "--resume", "auto"))
