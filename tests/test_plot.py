"""plot.py: the numbers behind the curves (Figs. 3-5, 7), the sample counts (Fig. 2) and the drawn predictions."""
import json
import re

import pytest
from PIL import Image

import draw
import plot
import train
from shapes import make_shapes


def write_run(run_dir, args, rows):
    run_dir.mkdir()
    if args is not None:
        (run_dir / "args.json").write_text(json.dumps(args))
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    return run_dir


def train_row(it, images, instances, pixels):
    return {"iter": it, "lr": 0.02, "loss": 1.0, "seen_images": images, "seen_instances": instances,
            "seen_pixels": pixels}


def eval_row(it, box, mask):
    return {"iter": it, "bbox/AP": box, "bbox/AP50": 2 * box, "segm/AP": mask}


@pytest.fixture
def runs(tmp_path):
    """A scratch run resumed at iteration 200 (its eval at 200 is written twice; the second one counts) and a
    pre-trained run without args.json (labelled by its folder)."""
    scratch = write_run(tmp_path / "scratch6x", {"init": "scratch", "preset": "tiny", "schedule": None,
                                                 "lr_steps": [240, 280], "batch_size": 4},
                        [train_row(100, 400, 1200, 400 * 128 * 160), eval_row(100, 0.10, 0.08),
                         eval_row(200, 0.20, 0.15),
                         train_row(200, 800, 2400, 800 * 128 * 160),               # resumed from iteration 100
                         eval_row(200, 0.25, 0.18), eval_row(300, 0.40, 0.35),
                         train_row(300, 1200, 3600, 1200 * 128 * 160)])
    pretrained = write_run(tmp_path / "pretrained2x", None,
                           [eval_row(100, 0.30, 0.25), train_row(100, 400, 1000, 400 * 100 * 100)])
    return scratch, pretrained


def test_curves_one_line_per_run_last_row_wins(runs, tmp_path):
    scratch, pretrained = runs
    out = tmp_path / "ap.png"
    curves = plot.plot_curves([str(scratch), str(pretrained)], str(out))
    assert out.stat().st_size > 0
    assert list(curves) == ["scratch tiny", "pretrained2x"]
    assert curves["scratch tiny"]["iters"] == [100, 200, 300]
    assert curves["scratch tiny"]["bbox/AP"] == pytest.approx([10.0, 25.0, 40.0])    # 0.25 replaced 0.20 at 200
    assert curves["scratch tiny"]["segm/AP"] == pytest.approx([8.0, 18.0, 35.0])
    assert curves["scratch tiny"]["lr_steps"] == [240, 280]
    assert curves["pretrained2x"] == {"iters": [100], "bbox/AP": [30.0], "segm/AP": [25.0], "keypoints/AP": [],
                                      "lr_steps": []}


def test_curves_of_box_only_and_keypoint_runs(tmp_path, capsys):
    """A Faster R-CNN run (VOC) has no mask AP and a keypoint run has keypoint AP: one panel per metric present."""
    faster = write_run(tmp_path / "faster", None, [{"iter": 50, "bbox/AP": 0.5}])
    keypoints = write_run(tmp_path / "kp", None, [{"iter": 50, "bbox/AP": 0.4, "keypoints/AP": 0.3}])
    curves = plot.plot_curves([str(faster), str(keypoints)], str(tmp_path / "ap.png"))
    assert curves["faster"]["segm/AP"] == [] and curves["faster"]["keypoints/AP"] == []
    assert curves["kp"]["keypoints/AP"] == pytest.approx([30.0])
    printed = capsys.readouterr().out
    assert "faster: box AP 50.0 at 50" in printed and "kp: box AP 40.0, keypoint AP 30.0 at 50" in printed


def test_one_evaluation_is_a_dot_with_a_note(tmp_path, capsys, monkeypatch):
    """The demo evaluates only at its end: one dot, its value written beside it, and a note how to get a curve."""
    demo = write_run(tmp_path / "demo", {"lr_steps": [320]}, [eval_row(400, 0.664, 0.602)])
    saved = []
    monkeypatch.setattr(plot.plt, "close", saved.append)
    curves = plot.plot_curves([str(demo)], str(tmp_path / "ap.png"))
    assert curves["demo"]["iters"] == [400] and curves["demo"]["bbox/AP"] == pytest.approx([66.4])
    box = saved[0].axes[0]
    assert [t.get_text() for t in box.texts] == ["66.4"] and box.get_xlim()[0] == 0
    assert "note: demo: one evaluation: train with --eval-period N for a curve" in capsys.readouterr().out


def loss_row(it, lr, cls, mask=None):
    row = {"iter": it, "lr": lr, "loss_rpn_cls": 0.5, "loss_cls": cls, "sec_per_iter": 0.3}
    if mask is not None:
        row["loss_mask"] = mask
    row["loss"] = sum(v for k, v in row.items() if k.startswith("loss_"))
    return row


def test_losses_one_panel_per_term_and_the_lr(tmp_path, capsys):
    """The total and each term of the training rows (evaluation rows left out, a resumed run's last rows win), the LR
    in its own panel; two runs overlaid, the one without a mask head drawn in the panels it has."""
    a = write_run(tmp_path / "a", {"init": "scratch", "preset": "tiny", "lr_steps": [30]},
                  [loss_row(10, 0.02, 1.0, 0.8), loss_row(20, 0.02, 3.0, 0.6), eval_row(20, 0.1, 0.1),
                   loss_row(20, 0.02, 2.0, 0.6),                                     # resumed from iteration 10
                   loss_row(30, 0.002, 0.5, 0.4)])
    b = write_run(tmp_path / "b", None, [loss_row(10, 0.01, 2.0), loss_row(20, 0.01, 1.0)])
    runs = plot.main(["losses", str(a), str(b), "--out", str(tmp_path / "losses.png")])
    assert (tmp_path / "losses.png").stat().st_size > 0
    assert list(runs) == ["scratch tiny", "b"]
    ra, rb = runs["scratch tiny"], runs["b"]
    assert ra["iters"] == [10, 20, 30] and ra["lr"] == [0.02, 0.02, 0.002] and ra["lr_steps"] == [30]
    assert ra["loss_cls"] == [1.0, 2.0, 0.5] and ra["loss_mask"] == [0.8, 0.6, 0.4]
    assert ra["loss"] == pytest.approx([2.3, 3.1, 1.4])
    assert "loss_mask" not in rb and rb["loss_cls"] == [2.0, 1.0] and rb["lr_steps"] == []
    assert "scratch tiny: loss 1.400 at 30" in capsys.readouterr().out
    smoothed = plot.plot_losses([str(a)], str(tmp_path / "smooth.png"), labels=["a"], smooth=2)["a"]
    assert smoothed["loss_cls"] == pytest.approx([1.0, 1.5, 1.25])  # the trailing mean of 2 rows
    assert smoothed["lr"] == [0.02, 0.02, 0.002]                     # the LR as logged


def test_losses_panels_and_errors(tmp_path, monkeypatch):
    run = write_run(tmp_path / "run", None, [loss_row(10, 0.02, 1.0, 0.8)])
    saved = []
    monkeypatch.setattr(plot.plt, "close", saved.append)
    plot.plot_losses([str(run)], str(tmp_path / "losses.png"))
    titles = [ax.get_title() for ax in saved[0].axes if ax.axison]
    assert titles == ["total loss", "loss_rpn_cls", "loss_cls", "loss_mask", "learning rate"]
    assert saved[0].axes[titles.index("learning rate")].get_yscale() == "log"
    evals_only = write_run(tmp_path / "evals", None, [eval_row(10, 0.1, 0.1)])
    with pytest.raises(SystemExit, match="no training rows"):
        plot.plot_losses([str(evals_only)], str(tmp_path / "losses.png"))


def test_curves_labels_from_the_command_line(runs, tmp_path):
    curves = plot.main(["curves", *map(str, runs), "--out", str(tmp_path / "ap.png"),
                        "--labels", "scratch", "pretrained"])
    assert list(curves) == ["scratch", "pretrained"]


def test_a_folder_that_is_not_a_run_is_a_one_line_error(tmp_path):
    with pytest.raises(SystemExit, match="no metrics.jsonl"):
        plot.plot_curves([str(tmp_path)], str(tmp_path / "ap.png"))


def test_runs_without_evaluations_or_with_too_few_labels_are_one_line_errors(runs, tmp_path, capsys):
    no_eval = write_run(tmp_path / "no_eval", None, [train_row(100, 400, 1200, 400 * 128 * 160)])
    with pytest.raises(SystemExit, match="no evaluation rows"):
        plot.plot_curves([str(no_eval)], str(tmp_path / "ap.png"))
    with pytest.raises(SystemExit):
        plot.main(["curves", *map(str, runs), "--labels", "only-one"])
    assert "--labels: 1 labels for 2 runs" in capsys.readouterr().err


def test_an_incomplete_last_line_is_skipped(runs, tmp_path, capsys):
    """A run killed while writing metrics.jsonl leaves half a row at its end."""
    scratch, _ = runs
    with open(scratch / "metrics.jsonl", "a") as f:
        f.write('{"iter": 400, "bbox/A')
    curves = plot.plot_curves([str(scratch)], str(tmp_path / "ap.png"))
    assert curves["scratch tiny"]["iters"] == [100, 200, 300]
    assert "skipped the incomplete last line 8 of" in capsys.readouterr().out


@pytest.mark.parametrize("metrics, args, error", [
    ('{"iter": 1, "bbox/AP": 0.1}\n{"iter": 2,\n{"iter": 3, "bbox/AP": 0.3}\n', None,
     r"run/metrics\.jsonl line 2 is not valid JSON"),
    ('{"iter": 1, "bbox/AP": 0.1}\n{"bbox/AP": 0.2}\n', None, r"run/metrics\.jsonl line 2 is not a metrics row"),
    ('[1, 2]\n{"iter": 1}\n', None, r"run/metrics\.jsonl line 1 is not a metrics row"),
    ('{"iter": 1, "bbox/AP": 0.1}\n', '{"init": ', r"run/args\.json is not valid JSON"),
    ('{"iter": 1, "bbox/AP": 0.1}\n', '["scratch"]', r"run/args\.json holds a list, not train.py's flags"),
    ('{"iter": 1, "bbox/AP": null}\n', None, r"run/metrics\.jsonl line 1 has bbox/AP None, not a finite number"),
    ('{"iter": 1, "bbox/AP": "0.5"}\n', None, r"line 1 has bbox/AP '0\.5', not a finite number"),
    ('{"iter": "5", "bbox/AP": 0.5}\n', None, r"line 1 is not a metrics row with an integer \"iter\""),
    ('{"iter": [2], "bbox/AP": 0.5}\n', None, r"line 1 is not a metrics row with an integer \"iter\""),
    ('{"iter": 1, "seen_images": true}\n', None, r"line 1 has seen_images True, not a finite number"),
    ('{"iter": 1, "bbox/AP": 0.1}\n', '{"lr_steps": 5}', r"run/args\.json has lr_steps 5, not a list of iterations"),
    ('{"iter": 1, "bbox/AP": 0.1}\n', "[" * 100_000, r"run/args\.json is not valid JSON \(RecursionError\)"),
    ('{"iter": 1, "bbox/AP": 0.1, "segm/AP": 0.2}\n{"iter": 2, "bbox/AP": 0.3}\n', None,
     r"some evaluation rows have segm/AP and others do not"),
    (b'{"iter": 1, "bbox/AP": 0.1}\n\xff\n', None, r"run/metrics\.jsonl is not UTF-8 text"),
    (b'\xef\xbb\xbf{"iter": 1, "bbox/AP": 0.1}\n{"iter": 2, "loss": "x"}\n', None,  # a BOM is read past
     r"run/metrics\.jsonl line 2 has loss 'x', not a finite number"),
])
def test_bad_run_files_are_one_line_errors(tmp_path, metrics, args, error):
    run = tmp_path / "run"
    run.mkdir()
    if isinstance(metrics, bytes):
        (run / "metrics.jsonl").write_bytes(metrics)
    else:
        (run / "metrics.jsonl").write_text(metrics)
    if args is not None:
        (run / "args.json").write_text(args)
    with pytest.raises(SystemExit, match=error):
        plot.plot_curves([str(run)], str(tmp_path / "ap.png"))


def test_sample_counts_with_the_paper_defaults():
    counts = plot.sample_counts()
    # ImageNet: 1,281,167 images x 100 epochs, 1 instance and 224 x 224 pixels each.
    assert counts["pre-training"] == {"images": 128_116_700, "instances": 128_116_700,
                                      "pixels": 128_116_700 * 224 * 224, "epochs": 100}
    # COCO: 2x = 180k iterations x 16 = 2.88M images; 6x = 540k x 16 = 8.64M; 7 instances, 800 x 1333 pixels each.
    assert counts["fine-tuning"]["images"] == 2_880_000 and counts["random init"]["images"] == 8_640_000
    assert counts["fine-tuning"]["instances"] == 20_160_000 and counts["random init"]["instances"] == 60_480_000
    assert counts["random init"]["pixels"] == 8_640_000 * 1_066_400 == 9_213_696_000_000          # 9.21e12
    assert counts["fine-tuning"]["epochs"] == pytest.approx(24.35, abs=0.01)
    assert counts["random init"]["epochs"] == pytest.approx(73.04, abs=0.01)
    total = counts["pre-training + fine-tuning"]
    assert total["images"] == 130_996_700                                    # 131.0M vs 8.64M: 15x more images
    assert total["pixels"] == 6_428_383_539_200 + 3_071_232_000_000 == 9_499_615_539_200   # 9.50e12 vs 9.21e12


def test_sample_counts_from_runs(runs):
    scratch, pretrained = runs
    counts = plot.sample_counts([str(pretrained), str(scratch)], coco_images=4)
    assert counts["fine-tuning"] == {"images": 400, "instances": 1000, "pixels": 400 * 100 * 100, "epochs": 100}
    assert counts["random init"] == {"images": 1200, "instances": 3600, "pixels": 1200 * 128 * 160, "epochs": 300}
    assert counts["pre-training + fine-tuning"]["images"] == 128_116_700 + 400


def test_plot_samples_draws_three_groups_of_two_bars(tmp_path, capsys):
    out = tmp_path / "fig2.png"
    bars = plot.plot_samples(plot.sample_counts(), str(out))
    assert out.stat().st_size > 0
    assert bars == {"images": (130_996_700, 8_640_000), "instances": (148_276_700, 60_480_000),
                    "pixels": (9_499_615_539_200, 9_213_696_000_000)}
    table = capsys.readouterr().out
    assert "130,996,700" in table and "9,213,696,000,000" in table


def test_samples_cli_patches(tmp_path, monkeypatch):
    saved = []
    monkeypatch.setattr(plot.plt, "close", saved.append)                     # keep the figure to count its bars
    plot.main(["samples", "--out", str(tmp_path / "fig2.png")])
    (ax,) = saved[0].axes
    assert len(ax.patches) == 3 * 2 and ax.get_yscale() == "log"


def test_samples_cli_wants_zero_or_two_runs(runs):
    with pytest.raises(SystemExit):
        plot.main(["samples", str(runs[0])])


def test_zero_counts_are_one_line_errors(tmp_path, capsys):
    """Zero samples cannot be drawn on a log axis nor divided by: refused as flags, or naming the run."""
    with pytest.raises(SystemExit):
        plot.main(["samples", "--coco-images", "0", "--out", str(tmp_path / "fig2.png")])
    assert "--coco-images: expected a positive integer, got '0'" in capsys.readouterr().err
    idle = write_run(tmp_path / "idle", None, [train_row(10, 0, 0, 0)])
    with pytest.raises(SystemExit, match=r"idle/metrics\.jsonl: the last training row \(iter 10\) has seen_images 0"):
        plot.sample_counts([str(idle), str(idle)])


@pytest.mark.parametrize("out, error", [("missing/fig2.png", "cannot write a file in the folder of .*missing/fig2.png"),
                                        ("fig2.pngg", "fig2.pngg: the extension must be one of .*png"),
                                        ("fig2", "fig2: the extension must be one of"),
                                        (".", "is a folder; give a file name in it")])
def test_out_is_checked_before_the_work(tmp_path, capsys, out, error):
    with pytest.raises(SystemExit):
        plot.main(["samples", "--out", str(tmp_path / out)])
    assert re.search(f"argument --out: .*{error}", capsys.readouterr().err)
    assert list(tmp_path.iterdir()) == []                                     # nothing written, not even fig2.png


def test_out_is_written_where_it_says(tmp_path, capsys):
    plot.main(["samples", "--out", str(tmp_path / "fig2.pdf")])
    assert (tmp_path / "fig2.pdf").read_bytes().startswith(b"%PDF")
    assert f"wrote {tmp_path / 'fig2.pdf'}\n" in capsys.readouterr().out


def test_draw_predictions_side_by_side(tmp_path):
    shapes = tmp_path / "shapes"
    make_shapes(str(shapes), num_train=4, num_val=2)
    run = tmp_path / "run"
    train.main(["--train-ann", str(shapes / "annotations" / "instances_train.json"),
                "--train-images", str(shapes / "train"),
                "--val-ann", str(shapes / "annotations" / "instances_val.json"), "--val-images", str(shapes / "val"),
                "--data", "custom", "--preset", "tiny", "--device", "cpu", "--batch-size", "2", "--min-size", "96",
                "--workers", "0", "--max-iters", "1", "--no-eval", "--output-dir", str(run)])
    # Score threshold 0: an untrained model scores low, but its boxes and masks are still drawn.
    drawn = plot.draw_predictions(str(run / "model_0000001.pth"), str(tmp_path / "pred"), num=8, score_thresh=0.0)
    assert len(drawn) == 2                                                    # only 2 validation images exist
    for image in drawn:
        with Image.open(image["path"]) as png:
            assert png.size == (2 * 160, 128 + draw.TITLE_PX)                 # GT | predictions, each 160 x 128
    # per image: the GT boxes of the json on the left, the model's (all of them at threshold 0) on the right
    gt = json.loads((shapes / "annotations" / "instances_val.json").read_text())["annotations"]
    for image_id, image in zip((1, 2), drawn):
        assert image["ground_truth"] == [[x, y, x + w, y + h] for x, y, w, h in
                                         (a["bbox"] for a in gt if a["image_id"] == image_id)]
        assert len(image["predictions"]) > 0
        assert all(0 <= x1 <= x2 <= 160 and 0 <= y1 <= y2 <= 128 for x1, y1, x2, y2 in image["predictions"])


@pytest.mark.parametrize("flags, error", [
    (["--device", "mps"], "argument --device: expected cpu, cuda or cuda:N, got 'mps'"),
    (["--zoom", "1000"], "argument --zoom: expected at most 16, got '1000'"),
    (["--score-thresh", "nan"], "argument --score-thresh: expected a non-negative number, got 'nan'"),
    (["--score-thresh", "2"], "argument --score-thresh: expected a number in [0, 1], got '2'"),
    (["--out-dir", "FILE"], "argument --out-dir: FILE is a file, not a folder"),
])
def test_predictions_flags_are_checked(tmp_path, capsys, flags, error):
    (tmp_path / "FILE").write_text("")
    flags = [str(tmp_path / "FILE") if f == "FILE" else f for f in flags]
    with pytest.raises(SystemExit):
        plot.main(["predictions", "--checkpoint", "x.pth", "--out-dir", str(tmp_path / "out"), *flags])
    assert error.replace("FILE", str(tmp_path / "FILE")) in capsys.readouterr().err
