"""train.py's console: the ETA over training time only, smoothed losses, plain lines off a terminal, the one-line
evaluation summary, the plan's warnings and the presets' image sizes."""
import argparse
import io

import pytest

import console
import evaluate
import train
from model import build_model


def fake_clock(times):
    """A clock that gives these seconds, one per call."""
    times = iter(times)
    return lambda: next(times)


def test_the_eta_leaves_out_evaluation_and_checkpoint_time():
    # two iterations of 1 s and 3 s; a 100-second evaluation between them is not timed
    clock = console.TrainingClock(clock=fake_clock([0.0, 1.0, 101.0, 104.0]))
    assert clock.eta(10) is None  # nothing timed yet
    clock.start()
    clock.stop()
    clock.start()
    clock.stop()
    assert clock.eta(10) == pytest.approx(10 * 2.0)  # the median of 1 s and 3 s, not (104 - 0) / 2 per iteration


def test_the_eta_is_the_median_of_the_last_iterations():
    clock = console.TrainingClock(window=3, clock=fake_clock([0, 50, 50, 51, 51, 52, 52, 53]))  # 50 s, then 1 s each
    for _ in range(4):
        clock.start()
        clock.stop()
    assert clock.eta(4) == 4.0  # the slow first iteration has left the window of 3


@pytest.mark.parametrize("seconds, text", [(None, "?"), (0.4, "0s"), (45, "45s"), (80, "1m20s"), (3600, "1h00m"),
                                           (3 * 3600 + 5 * 60 + 59, "3h05m"), (2 * 86400 + 4 * 3600, "2d04h")])
def test_durations(seconds, text):
    assert console.duration(seconds) == text


def test_plain_lines_every_log_period_with_median_losses(capsys):
    # 1 s per iteration; losses 1, 5, 2, 7 on one term: the median of the window, not the last value
    progress = console.Progress(0, 4, log_period=2, terminal=False, clock=fake_clock(range(100)))
    for done, value in enumerate([1.0, 5.0, 2.0, 7.0], 1):
        progress.start()
        progress.step(done, {"loss_cls": value, "loss_box": 0.25}, lr=0.02)
    progress.write("iter 4: box AP 1.0")
    progress.close()
    out = capsys.readouterr()
    lines = out.out.splitlines()
    assert lines[0].startswith("progress: losses are medians of the last 20 iterations")
    assert lines[1:] == ["iter 2/4  loss 3.250 (cls 3 box 0.25)  lr 0.02  eta 2s",
                         "iter 4/4  loss 3.750 (cls 3.5 box 0.25)  lr 0.02  eta 0s",
                         "iter 4: box AP 1.0"]
    assert out.err == ""  # no bar, no escape codes


def test_a_silent_progress_prints_nothing(capsys):
    progress = console.Progress(0, 2, log_period=1, enabled=False, terminal=True)
    progress.start()
    progress.step(1, {"loss_cls": 1.0}, lr=0.02)
    progress.write("iter 1: box AP 1.0")
    progress.close()
    assert capsys.readouterr() == ("", "")


def test_summary_line_names_the_metrics_present():
    assert evaluate.summary_line({"bbox/AP": 0.1234, "bbox/AP50": 0.5, "segm/AP": 0.101}) == \
        "box AP 12.3 | mask AP 10.1"
    assert evaluate.summary_line({"bbox/AP": 0.4, "keypoints/AP": 0.656}) == "box AP 40.0 | keypoint AP 65.6"
    assert evaluate.summary_line({"bbox/AP": 0.5, "voc/mAP50": 0.776, "voc/mAP50_11pt": 0.75}) == \
        "box AP 50.0 | VOC mAP50 77.6"


def plan(**flags):
    """A resolved plan with these values (the rest: one process, batch 4, LR 0.02)."""
    return argparse.Namespace(**{"max_iters": 400, "batch_size": 4, "world_size": 1, "warmup_iters": 50,
                                 "lr_steps": [320], "lr": 0.02, **flags})


def test_plan_warnings_name_the_flag_to_set():
    assert console.plan_warnings(plan(), 300) == []
    # PennFudanPed's 127 training images and r50_fpn_gn's default 1x at batch 4: 360,000 iterations
    (epochs,) = console.plan_warnings(plan(max_iters=360_000, lr_steps=[240_000, 320_000], warmup_iters=2000), 127)
    assert epochs.startswith("360000 iterations are 11,339 epochs of the 127 training images") and \
        epochs.endswith("set --max-iters or --schedule")
    (warmup,) = console.plan_warnings(plan(warmup_iters=400, lr_steps=[]), 300)
    assert "the warm-up (400 iterations) is as long as the run" in warmup
    (beyond,) = console.plan_warnings(plan(lr_steps=[320, 400, 500]), 300)
    assert "LR drop(s) at [400, 500] come at or after the run's end" in beyond and beyond.endswith("--lr-steps")
    (early,) = console.plan_warnings(plan(lr_steps=[30, 320]), 300)
    assert "LR drop(s) at [30] come before the warm-up ends (50 iterations)" in early and "--lr-steps" in early


def test_the_demo_and_the_readme_runs_plan_without_warnings():
    demo = train.resolve(train.get_args(["--device", "cpu"]))
    assert console.plan_warnings(demo, 300) == []  # the shapes set's 300 training images
    penn = train.resolve(train.get_args(["--device", "cpu", "--data", "PennFudanPed", "--preset", "r50_fpn_gn",
                                         "--batch-size", "8", "--lr", "0.01", "--max-iters", "2000",
                                         "--warmup-iters", "500"]))  # the README's PennFudanPed command
    assert console.plan_warnings(penn, 127) == []


@pytest.mark.parametrize("flags, sizes", [
    (["--data", "PennFudanPed"], (320, 533)),                                   # tiny: small on a CPU
    (["--data", "PennFudanPed", "--preset", "r50_fpn_gn"], (800, 1333)),        # the paper's
    (["--data", "PennFudanPed", "--min-size", "800"], (800, 1333)),             # the cap grows with the side
    (["--data", "PennFudanPed", "--min-size", "256"], (256, 533)),
    (["--data", "PennFudanPed", "--train-scales", "640,800"], (800, 1333)),     # tested at the range's top
    (["--data", "PennFudanPed", "--train-scales", "192,256"], (256, 533)),
    (["--data", "PennFudanPed", "--min-size", "2000"], (2000, 1333)),            # never beyond the paper's cap
    (["--data", "PennFudanPed", "--preset", "r50_fpn_gn", "--min-size", "1024"], (1024, 1333)),  # Detectron's
    (["--data", "PennFudanPed", "--max-size", "600"], (320, 600)),
    ([], (128, 1333)),                                                          # the demo, as before
    (["--preset", "r50_fpn_gn"], (128, 1333)),
])
def test_preset_image_sizes_resolve(flags, sizes):
    args = train.resolve(train.get_args(["--device", "cpu", *flags]))
    assert (args.min_size, args.max_size) == sizes


def test_image_sizes_are_not_model_options():
    with pytest.raises(ValueError, match=r"unknown model option\(s\) \['min_size'\]"):
        build_model("tiny", num_classes=3, min_size=320)


def test_coco_tables_go_to_the_stream(capsys):
    from test_evaluate import make_coco_gt
    tables = io.StringIO()
    perfect = [{"image_id": 1, "category_id": 7, "bbox": [10, 5, 20, 20], "score": 0.9}]
    gt = make_coco_gt()
    capsys.readouterr()  # COCO's "creating index..."
    metrics = evaluate.coco_eval(gt, perfect, iou_types=("bbox", "segm"), image_ids=[1], out=tables)
    assert capsys.readouterr().out == ""  # pycocotools' summarize() print()s: redirected too
    lines = tables.getvalue().splitlines()
    assert lines[0] == "--- bbox ---" and len([line for line in lines if line.startswith(" Average")]) == 12
    assert lines[-1] == "segm: no detections, AP = 0"
    assert metrics["bbox/AP"] == pytest.approx(1.0) and metrics["segm/AP"] == 0.0
