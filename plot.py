"""Figures of Rethinking ImageNet Pre-training (He, Girshick, Dollar 2019, arXiv:1811.08883), drawn from our runs.

    curves       Figs. 3-5 and 7: box AP and mask AP against iterations, one line per run (scratch and pre-trained on
                 one figure), the LR drops of each run marked by dotted lines in its colour.
    losses       the training losses (the total and each term) and the LR against iterations, one panel each.
    samples      Fig. 2 / Sec. 3.2: images, instances and pixels seen in pre-training + fine-tuning vs. from random
                 initialization (log scale), also printed as a table.
    predictions  ground truth (left) and a checkpoint's detections (right) on validation images: boxes, masks,
                 class names and scores.

    python plot.py curves runs/scratch_6x runs/pretrained_2x --out ap.png
    python plot.py losses runs/demo --smooth 5 --out losses.png
    python plot.py samples --out fig2.png                                 # the paper's 2x vs 6x COCO arithmetic
    python plot.py samples --out fig2.png runs/pretrained_2x runs/scratch_6x   # counts measured in two runs
    python plot.py predictions --checkpoint runs/demo/model_0000400.pth --out-dir runs/demo/predictions

Every subcommand is one function that returns the numbers it drew, so the tests check data, not pixels.
"""
import argparse
import itertools
import json
import os
import sys

import numpy as np
import torch
from PIL import Image

import data
import draw
import evaluate
from coco_json import is_numbers
from flags import at_most, device_name, folder, fraction, output_file, positive_int, run_script
from schedule import BATCH_1X, ITERS_1X

import matplotlib

matplotlib.use("Agg")  # headless: files only
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.backend_bases import FigureCanvasBase  # noqa: E402

COUNTS = ("images", "instances", "pixels")
COLOURS = plt.get_cmap("tab10").colors
PANELS = {"bbox/AP": "box AP", "segm/AP": "mask AP", "keypoints/AP": "keypoint AP"}  # metric -> panel title
LOSS_TERMS = ("loss_rpn_cls", "loss_rpn_box", "loss_cls", "loss_box", "loss_mask", "loss_keypoint")  # panel order
PRETRAINED_COLOUR, SCRATCH_COLOUR = "#4daf4a", "#984ea3"  # Fig. 2: green bars vs. purple bars


def _read_run(run_dir):
    """(args.json as a dict, or {} when absent; the rows of metrics.jsonl). A last line that is not JSON is skipped:
    a run killed while writing it. Any other bad line, or a bad args.json, is a one-line error naming the file."""
    metrics, args_file = os.path.join(run_dir, "metrics.jsonl"), os.path.join(run_dir, "args.json")
    if not os.path.isfile(metrics):
        sys.exit(f"error: {run_dir} has no metrics.jsonl; expected a train.py --output-dir")
    args = {}
    if os.path.isfile(args_file):
        with open(args_file, encoding="utf-8") as f:
            try:
                args = json.load(f)
            except (ValueError, RecursionError) as e:  # not JSON, not UTF-8, or nested deeper than Python recurses
                sys.exit(f"error: {args_file} is not valid JSON ({type(e).__name__})")
        if not isinstance(args, dict):
            sys.exit(f"error: {args_file} holds a {type(args).__name__}, not train.py's flags")
        steps = args.get("lr_steps") or []
        if not (isinstance(steps, list) and is_numbers(steps)):
            sys.exit(f"error: {args_file} has lr_steps {steps!r}, not a list of iterations")
    try:
        with open(metrics, encoding="utf-8-sig") as f:  # a byte-order mark, from an editor, is no row
            lines = [(number, line) for number, line in enumerate(f, 1) if line.strip()]
    except UnicodeDecodeError as e:
        sys.exit(f"error: {metrics} is not UTF-8 text (byte {e.start}); expected train.py's metrics.jsonl")
    rows = []
    for number, line in lines:
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            if number == lines[-1][0]:
                print(f"note: skipped the incomplete last line {number} of {metrics} (a run killed while writing it)")
                break
            sys.exit(f"error: {metrics} line {number} is not valid JSON")
        if not isinstance(row, dict) or not (is_numbers([row.get("iter")]) and isinstance(row["iter"], int)):
            sys.exit(f"error: {metrics} line {number} is not a metrics row with an integer \"iter\"")
        bad = next((k for k, v in row.items() if not is_numbers([v])), None)  # train.py writes numbers only
        if bad:
            sys.exit(f"error: {metrics} line {number} has {bad} {row[bad]!r}, not a finite number")
        rows.append(row)
    return args, rows


def figure_path(text):
    """--out: a file that can be written (flags.output_file) with an extension matplotlib writes."""
    formats = sorted(FigureCanvasBase.get_supported_filetypes())  # png, pdf, svg, ... (all backends)
    output_file(text)
    if os.path.splitext(text)[1].lower().lstrip(".") not in formats:
        raise argparse.ArgumentTypeError(f"{text}: the extension must be one of .{', .'.join(formats)}")
    return text


def _last_per_iter(rows):
    """A resumed run writes the iterations after its checkpoint again: the last row of each iteration wins."""
    by_iter = {row["iter"]: row for row in rows}
    return [by_iter[it] for it in sorted(by_iter)]


def _run_label(run_dir, args):
    """'scratch r50_fpn_gn 6x' from args.json; the folder name when the run has no args.json."""
    words = [str(args[k]) for k in ("init", "preset", "schedule") if args.get(k)]
    return " ".join(words) or os.path.basename(os.path.normpath(run_dir))


def _read_runs(run_dirs, labels=None):
    """[(label, args, rows)] of each run (_read_run): labels given, else _run_label's; two runs of the same recipe,
    e.g. two seeds, are told apart by their folder."""
    labels = labels or [None] * len(run_dirs)
    assert len(labels) == len(run_dirs), f"{len(labels)} labels for {len(run_dirs)} runs"
    runs, taken = [], set()
    for run_dir, label in zip(run_dirs, labels):
        args, rows = _read_run(run_dir)
        label = label or _run_label(run_dir, args)
        if label in taken:
            label = f"{label} ({os.path.basename(os.path.normpath(run_dir))})"
        taken.add(label)
        runs.append((label, args, rows))
    return runs


def plot_curves(run_dirs, out, labels=None):
    """Figs. 3-5, 7: box and mask AP (x100) of each run's evaluation rows against the iteration, LR drops dotted.
    Box-only runs (Faster R-CNN, VOC) have no mask panel; keypoint runs add a keypoint AP panel (Fig. 6).

    Returns {label: {"iters": [...], "bbox/AP": [...], "segm/AP": [...], "keypoints/AP": [...], "lr_steps": [...]}},
    with empty lists for the metrics a run does not have.
    """
    curves = {}
    for run_dir, (label, args, rows) in zip(run_dirs, _read_runs(run_dirs, labels)):
        evals = _last_per_iter([row for row in rows if "bbox/AP" in row])
        for key in PANELS:  # train.py's evaluation rows of one run all have the same metrics
            if 0 < sum(key in row for row in evals) < len(evals):
                sys.exit(f"error: {run_dir}/metrics.jsonl: some evaluation rows have {key} and others do not")
        curves[label] = {"iters": [row["iter"] for row in evals], "lr_steps": list(args.get("lr_steps") or []),
                         **{key: [100 * row[key] for row in evals if key in row] for key in PANELS}}

    panels = {key: title for key, title in PANELS.items() if any(curve[key] for curve in curves.values())}
    if not panels:
        sys.exit(f"error: no evaluation rows in the metrics.jsonl of {', '.join(run_dirs)} (run with --no-eval?)")
    fig, axes = plt.subplots(1, len(panels), figsize=(6 * len(panels), 4.5), squeeze=False)
    for ax, (key, title) in zip(axes[0], panels.items()):
        for (label, curve), colour in zip(curves.items(), itertools.cycle(COLOURS)):
            if curve[key]:
                ax.plot(curve["iters"], curve[key], "o-", color=colour, markersize=3 if len(curve[key]) > 1 else 7,
                        label=label)
            if len(curve[key]) == 1:  # one evaluation (the demo evaluates only at its end): a dot, its value written
                ax.annotate(f"{curve[key][0]:.1f}", (curve["iters"][0], curve[key][0]), xytext=(8, 0),
                            textcoords="offset points", va="center", color=colour)
            for step in curve["lr_steps"]:  # the paper's curves jump at each LR drop
                ax.axvline(step, color=colour, linestyle=":", linewidth=1)
        ax.set(title=title, xlabel="iterations", ylabel=f"{title} (%)")
        ax.set_xlim(0, 1.08 * ax.get_xlim()[1])  # from iteration 0, with room for a lone dot's value
        ax.grid(alpha=0.3)
    axes[0, 0].legend()
    single = [label for label, curve in curves.items() if len(curve["iters"]) == 1]
    if single:
        note = "one evaluation: train with --eval-period N for a curve"
        fig.text(0.5, 0.01, f"{', '.join(single)}: {note}", ha="center", fontsize=8)
        print(f"note: {', '.join(single)}: {note}")
    fig.suptitle("AP vs. iterations, LR drops dotted (Rethinking ImageNet Pre-training Figs. 3-5, 7)")
    fig.tight_layout(rect=(0, 0.03 if single else 0, 1, 1))
    fig.savefig(out, dpi=120)
    plt.close(fig)
    for label, curve in curves.items():
        final = ", ".join(f"{title} {curve[key][-1]:.1f}" for key, title in panels.items() if curve[key])
        final = f"{final} at {curve['iters'][-1]}" if curve["iters"] else "no evaluation rows"
        print(f"{label}: {final}")
    print(f"wrote {out}")
    return curves


def trailing_mean(values, n):
    """Each value replaced by the mean of it and the n - 1 before it (fewer at the start): --smooth n."""
    return [float(np.mean(values[max(0, i - n + 1):i + 1])) for i in range(len(values))]


def plot_losses(run_dirs, out, labels=None, smooth=1):
    """The training rows of each run against the iteration: the total loss and each loss term the runs have
    (loss_rpn_cls, loss_rpn_box, loss_cls, loss_box, loss_mask, loss_keypoint, then any other, e.g. the cascade's
    stages) in a panel each, and the LR (log scale) in the last; one colour per run, its LR drops dotted.
    A row holds one iteration's losses (train.py writes one every --log-period iterations); smooth: each loss drawn
    as the trailing mean of that many rows.

    Returns {label: {"iters": [...], "loss": [...], "loss_rpn_cls": [...], ..., "lr": [...], "lr_steps": [...]}},
    the values drawn (losses smoothed); a run's terms only.
    """
    runs = {}
    for run_dir, (label, args, rows) in zip(run_dirs, _read_runs(run_dirs, labels)):
        rows = _last_per_iter([row for row in rows if "loss" in row])
        names = sorted({k for row in rows for k in row if k.startswith("loss")})
        runs[label] = {"iters": [row["iter"] for row in rows], "lr_steps": list(args.get("lr_steps") or []),
                       "lr": [row.get("lr", float("nan")) for row in rows],
                       **{k: trailing_mean([row.get(k, float("nan")) for row in rows], smooth) for k in names}}
    if not any(run["iters"] for run in runs.values()):
        sys.exit(f"error: no training rows (with a loss) in the metrics.jsonl of {', '.join(run_dirs)}")
    present = {k for run in runs.values() for k in run if k.startswith("loss_")}
    panels = ["loss", *[k for k in LOSS_TERMS if k in present], *sorted(present - set(LOSS_TERMS)), "lr"]
    ncols = min(4, len(panels))
    nrows = -(-len(panels) // ncols)  # ceil
    fig, axes = plt.subplots(nrows, ncols, figsize=(4.2 * ncols, 3.4 * nrows), squeeze=False)
    for ax, key in itertools.zip_longest(axes.flat, panels):
        if key is None:  # the grid's spare cells
            ax.set_axis_off()
            continue
        for (label, run), colour in zip(runs.items(), itertools.cycle(COLOURS)):
            if key in run:
                ax.plot(run["iters"], run[key], "-", color=colour, linewidth=1.2, label=label)
            for step in run["lr_steps"]:
                ax.axvline(step, color=colour, linestyle=":", linewidth=1)
        title = {"loss": "total loss", "lr": "learning rate"}.get(key, key)
        ax.set(title=title, xlabel="iterations", yscale="log" if key == "lr" else "linear")
        ax.set_xlim(left=0)
        ax.grid(alpha=0.3)
    axes[0, 0].legend()
    smoothing = f", each the mean of {smooth} logged rows" if smooth > 1 else ""
    fig.suptitle(f"Training losses and LR vs. iterations{smoothing}, LR drops dotted")
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)
    for label, run in runs.items():
        print(f"{label}: loss {run['loss'][-1]:.3f} at {run['iters'][-1]}" if run["iters"] else
              f"{label}: no training rows")
    print(f"wrote {out}")
    return runs


def sample_counts(run_dirs=None, imagenet_images=1_281_167, imagenet_epochs=100, imagenet_size=224,
                  coco_images=118_287, instances_per_image=7, coco_pixels=800 * 1333, finetune_schedule=2,
                  scratch_schedule=6):
    """Sec. 3.2 / Fig. 2: images, instances and pixels seen in all training iterations.

    The paper calls these three "rough definitions" of samples: one image seen for 100 epochs counts 100 times.
    Pre-training is ImageNet-1k: imagenet_images x imagenet_epochs images, 1 instance each, imagenet_size^2 pixels.
    Without run_dirs, COCO fine-tuning and the from-scratch run are Nx schedules of N x 90k iterations at batch 16,
    each image with instances_per_image instances and coco_pixels pixels. The caption's per-image numbers (1 instance
    at 224^2; ~7 instances at 800x1333) are recalled, not confirmed; the text gives the three definitions and 3x
    more COCO iterations from scratch (6x vs. 2x, as it implies). With run_dirs = (pre-trained run, scratch run),
    the COCO counts are the seen_images / seen_instances / seen_pixels of each run's last training row (resized,
    unpadded pixels).

    Returns {"pre-training", "fine-tuning", "random init": {"images", "instances", "pixels", "epochs"},
             "pre-training + fine-tuning": {"images", "instances", "pixels"}}; epochs = images / coco_images.
    """
    pretrain_images = imagenet_images * imagenet_epochs
    counts = {"pre-training": {"images": pretrain_images, "instances": pretrain_images,
                               "pixels": pretrain_images * imagenet_size ** 2, "epochs": imagenet_epochs}}
    if run_dirs:
        assert len(run_dirs) == 2, f"expected (pre-trained run, scratch run), got {run_dirs}"
        for name, run_dir, init in zip(("fine-tuning", "random init"), run_dirs, ("imagenet", "scratch")):
            args, rows = _read_run(run_dir)
            if args.get("init", init) != init:
                print(f"note: {run_dir} is an --init {args['init']} run, drawn as {name}")
            seen = [row for row in rows if "seen_images" in row]
            if not seen:
                sys.exit(f"error: {run_dir}/metrics.jsonl has no training rows with seen_images")
            counts[name] = {k: seen[-1].get(f"seen_{k}") for k in COUNTS}
            if not all(isinstance(v, (int, float)) and v > 0 for v in counts[name].values()):  # log axis, ratios
                sys.exit(f"error: {run_dir}/metrics.jsonl: the last training row (iter {seen[-1]['iter']}) has "
                         f"{', '.join(f'seen_{k} {v}' for k, v in counts[name].items())}; expected positive counts")
    else:
        for name, schedule in (("fine-tuning", finetune_schedule), ("random init", scratch_schedule)):
            images = round(schedule * ITERS_1X * BATCH_1X)
            counts[name] = {"images": images, "instances": images * instances_per_image,
                            "pixels": images * coco_pixels}
    for name in ("fine-tuning", "random init"):
        counts[name]["epochs"] = counts[name]["images"] / coco_images
    counts["pre-training + fine-tuning"] = {k: counts["pre-training"][k] + counts["fine-tuning"][k] for k in COUNTS}
    return counts


def plot_samples(counts, out):
    """Fig. 2: for each of images, instances, pixels, a green bar (pre-training + fine-tuning) and a purple bar
    (random initialization) on a log axis. Prints the table. Returns {count: (pre-trained total, scratch total)}."""
    columns = ("pre-training", "fine-tuning", "pre-training + fine-tuning", "random init")
    print(f"{'':10s}" + "".join(f"{c:>27s}" for c in columns) + f"{'ratio':>10s}")
    for k in COUNTS:
        ratio = counts["pre-training + fine-tuning"][k] / counts["random init"][k]
        print(f"{k:10s}" + "".join(f"{counts[c][k]:>27,}" for c in columns) + f" {ratio:>9.3g}")
    print(f"{'epochs':10s}" + "".join(f"{counts[c]['epochs']:>27.1f}" if "epochs" in counts[c] else " " * 27
                                      for c in columns))

    bars = {k: (counts["pre-training + fine-tuning"][k], counts["random init"][k]) for k in COUNTS}
    x, width = np.arange(len(COUNTS)), 0.38
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for offset, side, colour, name in ((-width / 2, 0, PRETRAINED_COLOUR, "pre-training + fine-tuning"),
                                       (width / 2, 1, SCRATCH_COLOUR, "random init")):
        values = [bars[k][side] for k in COUNTS]
        ax.bar(x + offset, values, width, color=colour, label=name)
        for xi, v in zip(x + offset, values):
            exponent = int(np.floor(np.log10(v)))
            ax.text(xi, v * 1.15, f"{v / 10 ** exponent:.2f}e{exponent}", ha="center", fontsize=8)  # 9.50e12
    ax.set_yscale("log")
    ax.set_xticks(x, COUNTS)
    ax.set_ylabel("samples seen in all training iterations")
    ax.set_title("Images, instances, pixels seen (Rethinking ImageNet Pre-training Fig. 2)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)
    print(f"wrote {out}")
    return bars


@torch.no_grad()
def draw_predictions(checkpoint, out_dir, data_root=None, val_ann=None, val_images=None, num=8, score_thresh=0.5,
                     mask_thresh=0.5, device="cpu", zoom=1):
    """For the first num validation images, one PNG of 2 x zoom x W0 by zoom x H0 pixels under a title band of
    draw.TITLE_PX: the ground truth on the left, the checkpoint's detections with score >= score_thresh on the right,
    masks thresholded at mask_thresh (Mask R-CNN Sec. 3), keypoints joined by the data's skeleton (draw.py). Data
    flags default to the checkpoint's own run, as in evaluate.py.
    Returns, per image, {"path": its PNG, "ground_truth": the boxes drawn left, "predictions": the boxes drawn right},
    boxes as [x1, y1, x2, y2] in original image pixels."""
    model, dataset = evaluate.load_run(checkpoint, data_root, val_ann, val_images)
    device = torch.device(device)
    model.to(device).eval()
    os.makedirs(out_dir, exist_ok=True)
    coco, drawn = dataset.coco, []
    for images, image_sizes, targets in itertools.islice(data.make_eval_loader(dataset, 1, workers=0), num):
        image_id, orig_size = targets[0]["image_id"], tuple(targets[0]["orig_size"])
        info = coco.imgs[image_id]
        image = np.asarray(Image.open(os.path.join(dataset.image_dir, info["file_name"])).convert("RGB"))
        (out,) = model(images.to(device), image_sizes, original_sizes=[orig_size])  # in original image pixels

        anns = coco.loadAnns(coco.getAnnIds(imgIds=image_id))
        gt_boxes = [(x, y, x + w, y + h) for x, y, w, h in (ann["bbox"] for ann in anns)]
        gt_labels = [dataset.cat_ids.index(ann["category_id"]) + 1 for ann in anns]
        gt_masks = np.stack([coco.annToMask(ann) for ann in anns]) if dataset.has_masks and anns else None  # VOC: none
        J = dataset.num_keypoints  # (G, J, 3) as x, y, v; an object of a class without keypoints has none
        gt_keypoints = np.reshape([ann.get("keypoints") or [0] * 3 * J for ann in anns], (len(anns), J, 3))
        keep = out["scores"] >= score_thresh
        best = out["scores"].max().item() if len(out["scores"]) else None
        out = {k: v[keep].cpu() for k, v in out.items()}  # one row per detection in each entry
        pred_masks = out["masks"][:, 0] > mask_thresh if "masks" in out else None  # (D, H0, W0)

        h0, w0 = orig_size
        fig, axes = draw.figure(h0, w0, panels=2, zoom=zoom)
        skeleton = dataset.keypoint_skeleton
        draw.draw_instances(axes[0], image, gt_boxes, gt_labels, dataset.class_names, masks=gt_masks,
                            keypoints=gt_keypoints if J else None,
                            skeleton=skeleton, title=f"ground truth: {len(anns)}",
                            notes=["(crowd)" if ann.get("iscrowd") else "" for ann in anns])
        draw.draw_instances(axes[1], image, out["boxes"], out["labels"], dataset.class_names, scores=out["scores"],
                            masks=pred_masks, keypoints=out.get("keypoints"), skeleton=skeleton,
                            title=f"predictions, score >= {score_thresh:g}: {len(out['labels'])}",
                            score_thresh=score_thresh, best_score=best)
        path = os.path.join(out_dir, f"predictions_{image_id:06d}.png")
        draw.save(fig, path)
        drawn.append({"path": path, "ground_truth": [list(box) for box in gt_boxes],
                      "predictions": out["boxes"].tolist()})
    print(f"wrote {len(drawn)} images to {out_dir}")
    return drawn


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)

    c = sub.add_parser("curves", help="Figs. 3-5, 7: box and mask AP vs. iterations of one or more runs")
    c.add_argument("run_dirs", nargs="+", help="train.py --output-dir folders (args.json + metrics.jsonl)")
    c.add_argument("--out", type=figure_path, default="ap.png", help="output image (.png, .pdf, .svg, ...)")
    c.add_argument("--labels", nargs="+", help="one legend label per run (default: init, preset, schedule)")

    c = sub.add_parser("losses", help="the training losses and the LR vs. iterations of one or more runs")
    c.add_argument("run_dirs", nargs="+", help="train.py --output-dir folders (args.json + metrics.jsonl)")
    c.add_argument("--out", type=figure_path, default="losses.png", help="output image (.png, .pdf, .svg, ...)")
    c.add_argument("--labels", nargs="+", help="one legend label per run (default: init, preset, schedule)")
    c.add_argument("--smooth", type=positive_int, default=1,
                   help="draw each loss as the mean of the last N logged rows (default 1: as logged)")

    s = sub.add_parser("samples", help="Fig. 2: images, instances, pixels seen, pre-trained vs. from scratch")
    s.add_argument("run_dirs", nargs="*", help="optional: PRETRAINED_RUN SCRATCH_RUN, to count what they saw")
    s.add_argument("--out", type=figure_path, default="fig2.png", help="output image (.png, .pdf, .svg, ...)")
    s.add_argument("--imagenet-images", type=positive_int, default=1_281_167,
                   help="ImageNet-1k train images (1,281,167)")
    s.add_argument("--imagenet-epochs", type=positive_int, default=100, help="pre-training epochs (paper: 100)")
    s.add_argument("--imagenet-size", type=positive_int, default=224,
                   help="pre-training crop side, 1 instance per image (224)")
    s.add_argument("--coco-images", type=positive_int, default=118_287,
                   help="training set size, for epochs (COCO train2017: 118,287; give yours with run dirs)")
    s.add_argument("--instances-per-image", type=positive_int, default=7, help="COCO instances per image (caption: ~7)")
    s.add_argument("--coco-pixels", type=positive_int, default=800 * 1333,
                   help="COCO pixels per image (caption: 800x1333)")
    s.add_argument("--finetune-schedule", type=at_most(1000, float), default=2,
                   help="fine-tuning schedule, N x 90k at batch 16 (2)")
    s.add_argument("--scratch-schedule", type=at_most(1000, float), default=6,
                   help="from-scratch schedule (paper: 6, 3x longer)")

    r = sub.add_parser("predictions", help="ground truth vs. a checkpoint's detections on validation images")
    r.add_argument("--checkpoint", required=True, help="a model_*.pth written by train.py")
    r.add_argument("--out-dir", type=folder, required=True, help="folder for one PNG per image")
    r.add_argument("--data", help="as in train.py (default: the checkpoint's own --data)")
    r.add_argument("--val-ann", help="COCO json of the images to draw (overrides --data)")
    r.add_argument("--val-images", help="image folder for --val-ann")
    r.add_argument("--num", type=positive_int, default=8, help="how many validation images, from the first")
    r.add_argument("--score-thresh", type=fraction, default=0.5, help="draw detections scoring at least this")
    r.add_argument("--mask-thresh", type=fraction, default=0.5, help="mask probability threshold (Mask R-CNN: 0.5)")
    r.add_argument("--zoom", type=at_most(16), default=1, help="enlarge small images, e.g. 4 for the 128x160 shapes")
    r.add_argument("--device", type=device_name, default="cpu", help="cpu or cuda")
    args = p.parse_args(argv)

    if args.command in ("curves", "losses") and args.labels and len(args.labels) != len(args.run_dirs):
        p.error(f"--labels: {len(args.labels)} labels for {len(args.run_dirs)} runs")
    if args.command == "curves":
        return plot_curves(args.run_dirs, args.out, labels=args.labels)
    if args.command == "losses":
        return plot_losses(args.run_dirs, args.out, labels=args.labels, smooth=args.smooth)
    if args.command == "samples":
        if len(args.run_dirs) not in (0, 2):
            p.error("samples takes no run dirs, or two: PRETRAINED_RUN SCRATCH_RUN")
        counts = sample_counts(args.run_dirs, imagenet_images=args.imagenet_images,
                               imagenet_epochs=args.imagenet_epochs, imagenet_size=args.imagenet_size,
                               coco_images=args.coco_images, instances_per_image=args.instances_per_image,
                               coco_pixels=args.coco_pixels, finetune_schedule=args.finetune_schedule,
                               scratch_schedule=args.scratch_schedule)
        plot_samples(counts, args.out)
        return counts
    return draw_predictions(args.checkpoint, args.out_dir, data_root=args.data, val_ann=args.val_ann,
                            val_images=args.val_images, num=args.num, score_thresh=args.score_thresh,
                            mask_thresh=args.mask_thresh, device=args.device, zoom=args.zoom)


if __name__ == "__main__":
    run_script(main)
