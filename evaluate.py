"""COCO evaluation: run the model over a dataset, write COCO results json, score it with pycocotools' COCOeval.

The metrics are the paper's: box AP and mask AP (AP at IoU 0.5:0.95, plus AP50, AP75, small/medium/large and AR),
Lin et al., "Microsoft COCO" (2014) and cocodataset.org/#detection-eval; keypoint AP (Fig. 6) at OKS 0.5:0.95,
cocodataset.org/#keypoints-eval. A model without mask head gets box AP only; on PASCAL VOC (Sec. 5.2) VOC mAP at
IoU 0.5 is added, area and 11-point (voc.py).

    python evaluate.py --checkpoint runs/demo/model_0000400.pth            # data flags default to the run's own
    torchrun --nproc_per_node=8 evaluate.py --checkpoint ...               # each GPU takes 1/8 of the images
    python evaluate.py --checkpoint CKPT --tta-scales 400,600,1000,1200 --tta-flip   # Sec. 5.1, 800 plus these

Results json (COCO results format): bbox as [x, y, w, h] in original image pixels, segmentation as RLE of the
mask thresholded at 0.5 (Mask R-CNN Sec. 3.1, "Inference"), keypoints as [x1, y1, v1, x2, ...] with v = 1,
category_id the dataset's original id (not the contiguous label).

Shapes: R detections of one image, (h, w) its original size, K keypoints; boxes (R, 4) as (x1, y1, x2, y2).
"""
import argparse
import contextlib
import io
import json
import sys
import types

import numpy as np
import pycocotools.mask as mask_util
import torch
from pycocotools.cocoeval import COCOeval
from tqdm import tqdm

import checkpoint
import data
import distributed
import related_work
import tta
import voc
from flags import (MAX_SIDE, amp_dtype, at_most, device_name, non_negative_float, non_negative_int, output_file,
                   positive_int, run_script, scale_list)
from model import PRESETS, build_for_data
from norm import NORM_KINDS

METRICS = ["AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100", "ARs", "ARm", "ARl"]
KEYPOINT_METRICS = ["AP", "AP50", "AP75", "APm", "APl", "AR", "AR50", "AR75", "ARm", "ARl"]  # COCOeval's order
SUMMARY = {"bbox/AP": "box AP", "segm/AP": "mask AP", "keypoints/AP": "keypoint AP", "voc/mAP50": "VOC mAP50"}


@torch.no_grad()
def predict(model, dataset, device, amp="none", workers=2, tta_scales=(), tta_flip=False, tta_max_size=2000):
    """Inference over this process's shard of the dataset (all of it in one process); returns a list of
    COCO-format result dicts (boxes and masks). tta_scales (shorter sides added to the dataset's, their longer side
    capped at tta_max_size) and/or tta_flip: test-time augmentation (tta.py), one image at a time."""
    if tta_scales or tta_flip:
        outputs = tta.predict(model, dataset, device, tta_scales, tta_flip, amp, workers, tta_max_size)
        return [r for out, target in outputs for r in to_coco_results(out, target["image_id"], dataset.cat_ids)]
    model.eval()
    dtype = amp_dtype(amp)
    results = []
    loader = data.make_eval_loader(dataset, 1, workers=workers, rank=distributed.get_rank(),  # an image at a time
                                   world_size=distributed.get_world_size())
    # disable=None: no bar where stderr is not a terminal (a log file), and none on ranks > 0
    for images, image_sizes, targets in tqdm(loader, desc="eval", leave=False, dynamic_ncols=True,
                                             disable=None if distributed.get_rank() == 0 else True):
        original_sizes = [tuple(t["orig_size"]) for t in targets]
        with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
            outputs = model(images.to(device), image_sizes, original_sizes=original_sizes)
        for out, target in zip(outputs, targets):
            results.extend(to_coco_results(out, target["image_id"], dataset.cat_ids))
    return results


def to_coco_results(out, image_id, cat_ids):
    """One image's detections (model output, original pixels) -> COCO result dicts: bbox (x, y, w, h), score,
    category_id (the dataset's id of the contiguous label), and segmentation (RLE) and keypoints when present."""
    boxes = out["boxes"].float().cpu()
    xywh = torch.cat([boxes[:, :2], boxes[:, 2:] - boxes[:, :2]], dim=1).tolist()   # (x1, y1, x2, y2) -> (x, y, w, h)
    scores, labels = out["scores"].float().tolist(), out["labels"].tolist()
    rles = [None] * len(scores)
    keypoints = [None] * len(scores)
    if "keypoints" in out:
        keypoints = out["keypoints"].float().reshape(len(scores), -1).tolist()  # (R, K, 3) -> (R, 3K) flat
    if "masks" in out and len(scores):
        binary = (out["masks"][:, 0] > 0.5).cpu().numpy().astype(np.uint8)           # (R, h, w), threshold 0.5
        rles = mask_util.encode(np.asfortranarray(binary.transpose(1, 2, 0)))        # (h, w, R), Fortran order
        for rle in rles:
            rle["counts"] = rle["counts"].decode("ascii")
    results = []
    for box, score, label, rle, kps in zip(xywh, scores, labels, rles, keypoints):
        r = {"image_id": int(image_id), "category_id": cat_ids[label - 1], "bbox": box, "score": score}
        if rle is not None:
            r["segmentation"] = rle
        if kps is not None:  # scored by the box score, as Detectron (KRCNN.KEYPOINT_CONFIDENCE "bbox") and detectron2
            r["keypoints"] = kps
        results.append(r)
    return results


def coco_eval(coco_gt, results, iou_types=("bbox", "segm"), image_ids=None, keypoint_sigmas=None, out=None):
    """COCOeval summaries, printed as pycocotools prints them into the stream out (None: stdout) and returned as
    {'bbox/AP': ..., 'segm/AR100': ...}; iou_type "keypoints" scores OKS with the per-keypoint keypoint_sigmas
    (default pycocotools', COCO's)."""
    metrics = {}
    for iou_type in iou_types:
        names = KEYPOINT_METRICS if iou_type == "keypoints" else METRICS
        # copies: loadRes adds fields in place, a box's polygon as "segmentation" among them, which would make box-only
        # results look like masks to the next iou_type
        dets = [dict(r) for r in results if iou_type == "bbox" or "segmentation" in r]
        if iou_type == "keypoints":  # copies without box and mask: loadRes then takes the area from the keypoints
            dets = [{k: v for k, v in r.items() if k not in ("bbox", "segmentation")}
                    for r in results if "keypoints" in r]
        if not dets:  # pycocotools cannot load an empty result list; nothing detected scores zero
            print(f"{iou_type}: no detections, AP = 0", file=out)
            metrics.update({f"{iou_type}/{m}": 0.0 for m in names})
            continue
        with contextlib.redirect_stdout(io.StringIO()):
            coco_dt = coco_gt.loadRes(dets)
            evaluator = COCOeval(coco_gt, coco_dt, iou_type)
            if image_ids is not None:
                evaluator.params.imgIds = list(image_ids)
            if iou_type == "keypoints" and keypoint_sigmas is not None:
                evaluator.params.kpt_oks_sigmas = np.array(keypoint_sigmas)
            evaluator.evaluate()
            evaluator.accumulate()
        print(f"--- {iou_type} ---", file=out)
        with contextlib.redirect_stdout(out) if out else contextlib.nullcontext():  # summarize() print()s
            evaluator.summarize()
        metrics.update({f"{iou_type}/{m}": float(v) for m, v in zip(names, evaluator.stats)})
    return metrics


def summary_line(metrics):
    """The headline numbers of an evaluation in one line, 'box AP 66.4 | mask AP 60.2' (x100; those present of box,
    mask and keypoint AP and VOC mAP50), for train.py's console and the end of evaluate.py's tables."""
    return " | ".join(f"{name} {100 * metrics[key]:.1f}" for key, name in SUMMARY.items() if key in metrics)


def evaluate(model, dataset, device, amp="none", workers=2, results_file=None, tta_scales=(), tta_flip=False,
             tta_max_size=2000, tables=None):
    """COCO metrics of the model on the dataset, its COCOeval (and VOC) tables printed into the stream tables (None:
    stdout). With several processes each predicts its shard of the images and rank 0 scores them all; the other
    processes return None."""
    shards = distributed.gather(predict(model, dataset, device, amp=amp, workers=workers, tta_scales=tta_scales,
                                        tta_flip=tta_flip, tta_max_size=tta_max_size))
    if shards is None:  # not rank 0
        return None
    # image by image in dataset order, as one process writes them (a stable sort keeps each image's own order)
    results = sorted((r for shard in shards for r in shard), key=lambda r: r["image_id"])
    if results_file:
        with open(results_file, "w") as f:
            json.dump(results, f)
    heads = model.roi_heads  # Faster R-CNN: boxes only; keypoint R-CNN: boxes and keypoints
    iou_types = ["bbox"] + ["segm"] * (heads.mask_head is not None) + ["keypoints"] * (heads.keypoint_head is not None)
    metrics = coco_eval(dataset.coco, results, iou_types, image_ids=dataset.image_ids,
                        keypoint_sigmas=dataset.keypoint_sigmas, out=tables)
    if isinstance(dataset, data.VOCDataset):  # Rethinking Sec. 5.2 reports PASCAL VOC mAP at IoU 0.5
        metrics.update(voc.voc_metrics(dataset, results, out=tables))
    return metrics


def evaluate_and_log(model, dataset, device, iteration, metrics, amp="none", workers=2, tables=None, log=print):
    """train.py's evaluation at an iteration: every process predicts its shard of the images, rank 0 gathers them,
    runs COCOeval, writes the row {"iter": iteration, metric: value, ...} into metrics (the run's open
    metrics.jsonl on rank 0, None on the others) and logs 'iter N: box AP .. | mask AP ..'; the model then goes back
    to training mode. tables: the open stream that takes the COCOeval tables, under a header naming the iteration
    (train.py: the run's eval_log.txt, or stdout with --coco-tables; None: stdout)."""
    distributed.broadcast_buffers(model)  # --norm bn: every shard evaluated with rank 0's statistics
    # the loader draws its workers' seeds from the torch RNG: forked, so that a resumed run takes the same draws
    if metrics is not None:  # rank 0 alone scores, prints and writes
        print(f"=== iteration {iteration} ===", file=tables)
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        try:
            results = evaluate(model, dataset, device, amp=amp, workers=workers, tables=tables)
        except data.DataError as e:  # raised in a loader worker: the one line that names the culprit
            sys.exit(f"error: {e.line()}")
    if metrics is not None:
        (tables or sys.stdout).flush()  # a killed run keeps the tables written before
        checkpoint.write_row(metrics, {"iter": iteration, **results})
        log(f"iter {iteration}: {summary_line(results)}")
    model.train()


RUN_KEYS = ("model", "args.preset", "args.norm", "args.data", "args.min_size", "args.max_size", "args.val_ann",
            "args.val_images")  # what load_run and predict.py read of a train.py checkpoint


def read_run(path):
    """A train.py checkpoint whose flags this code can rebuild the model from, or a one-line error naming it."""
    ckpt = checkpoint.read(path, keys=RUN_KEYS)
    run = ckpt["args"]
    sizes = (run["min_size"], run["max_size"])
    if not all(isinstance(s, int) and not isinstance(s, bool) and 0 < s <= MAX_SIDE for s in sizes):
        sys.exit(f"error: checkpoint {path} has min_size {sizes[0]!r} and max_size {sizes[1]!r}: not train.py's "
                 f"(positive integers up to {MAX_SIDE})")
    if run["preset"] not in PRESETS or run["norm"] not in (None, *NORM_KINDS):
        sys.exit(f"error: checkpoint {path} names preset {run['preset']!r} and norm {run['norm']!r}; this code knows "
                 f"the presets {', '.join(PRESETS)} and the norms {', '.join(NORM_KINDS)}")
    return ckpt


def run_model(path, ckpt, heads, plain_ops=None):
    """The model of checkpoint ckpt (read from path by read_run) as train.py built it, with its weights:
    build_for_data for heads (what the data decides: num_classes, has_masks, num_keypoints; a dataset, or predict.py's
    record of one) with the run's norm, cascade, attention and plain_ops (unless given). A one-line error when they
    do not fit."""
    run = ckpt["args"]
    model = build_for_data(run["preset"], heads, norm=run["norm"], cascade=run.get("cascade", False),
                           plain_ops=run.get("plain_ops", False) if plain_ops is None else plain_ops,
                           attention=run.get("attention"))
    try:
        model.load_state_dict(ckpt["model"])
    except RuntimeError as e:
        sys.exit(f"error: checkpoint {path} does not fit preset {run['preset']} with "
                 f"{heads.num_classes} classes: {str(e).splitlines()[0]}")
    return model


def describe_data(path, ckpt):
    """What the data told train.py, from the checkpoint alone: (heads for run_model, [[category id, name]],
    keypoint skeleton). A checkpoint written before train.py recorded its data gets numbered classes, as many as
    its box predictor's class scores (background included) and its keypoint head's outputs say."""
    state, recorded = ckpt["model"], ckpt.get("data") or {}
    classes = recorded.get("classes")
    if classes is None:
        scores = next((v for k, v in state.items() if k.endswith("box_predictor.cls_score.weight")), None)  # (K, C)
        if scores is None:
            sys.exit(f"error: checkpoint {path} holds no box predictor (roi_heads...cls_score.weight): not a model "
                     f"train.py wrote")
        classes = [[c, f"class {c}"] for c in range(1, len(scores))]
        print(f"note: checkpoint {path} records no class names (written before train.py kept them): the classes are "
              f"numbered class 1..class {len(classes)}")
    keypoints = state.get("roi_heads.keypoint_head.deconv.bias")  # (J,): one heatmap per keypoint
    heads = types.SimpleNamespace(num_classes=len(classes) + 1,
                                  has_masks=any(k.startswith("roi_heads.mask_head.") for k in state),
                                  num_keypoints=0 if keypoints is None else len(keypoints))
    return heads, classes, recorded.get("keypoint_skeleton") or []


def load_run(path, data_root=None, val_ann=None, val_images=None, min_size=None, max_size=None, plain_ops=None):
    """The model of a train.py checkpoint (path) and its validation set; data flags and plain_ops (--plain-ops)
    default to the run's own. Problems end the program with a one-line error naming the checkpoint or the data."""
    ckpt = read_run(path)
    run = ckpt["args"]
    try:
        with distributed.rank_zero_first():  # under torchrun, rank 0 writes the synthetic set if it is missing
            dataset = data.build_dataset(data_root or run["data"], "val", train=False,
                                         min_size=min_size or run["min_size"], max_size=max_size or run["max_size"],
                                         ann=val_ann or (None if data_root else run["val_ann"]),
                                         images=val_images or (None if data_root else run["val_images"]),
                                         keypoint_sigmas=run.get("keypoint_sigmas"))
    except data.DataError as e:
        sys.exit(f"error: {e}")
    trained = (ckpt.get("data") or {}).get("classes")  # checkpoints written since train.py records them
    if trained and trained != dataset.classes:  # the labels would be reported as other categories
        sys.exit(f"error: checkpoint {path} was trained on the classes {trained}, but {dataset.source} has "
                 f"{dataset.classes}")
    if PRESETS[run["preset"]]["num_keypoints"] and not dataset.num_keypoints:  # found before inference, not by COCOeval
        sys.exit(f"error: preset {run['preset']} predicts keypoints, but {dataset.source} names none; evaluate it on a "
                 f"COCO person-keypoints json")
    return run_model(path, ckpt, dataset, plain_ops), dataset


def print_slimming_report(model, threshold):
    """Network slimming (Liu et al. 2017, related work; train.py --slim): per norm layer, the channels whose |gamma| is
    below threshold, and the parameters a pruned model would save (related_work.slimming_report: a lower bound)."""
    report = related_work.slimming_report(model, threshold)
    for name, channels, pruned, saved in report["layers"]:
        print(f"{name}: {pruned} of {channels} channels with |gamma| < {threshold:g}, {saved} parameters")
    print(f"all norm layers: {report['pruned']} of {report['channels']} channels; pruning them saves at least "
          f"{report['saved']} of {report['total']} parameters ({100 * report['saved'] / report['total']:.2f}%)")
    return report


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="a model_*.pth written by train.py")
    p.add_argument("--data", help="as in train.py (default: the checkpoint's own --data)")
    p.add_argument("--val-ann", help="COCO json to evaluate on (overrides --data)")
    p.add_argument("--val-images", help="image folder for --val-ann")
    p.add_argument("--min-size", type=at_most(MAX_SIDE),
                   help="shorter side at test (default: the checkpoint's; paper: 800)")
    p.add_argument("--max-size", type=at_most(MAX_SIDE),
                   help="cap on the longer side (default: the checkpoint's; paper: 1333)")
    p.add_argument("--device", type=device_name, default="cuda" if torch.cuda.is_available() else "cpu",
                   help="cpu or cuda")
    p.add_argument("--amp", choices=["none", "bf16", "fp16"], default="none", help="mixed precision autocast")
    p.add_argument("--plain-ops", action=argparse.BooleanOptionalAction, default=None,
                   help="run the paper's plain versions of GroupNorm, NMS, proposal selection, RoIAlign, mask targets "
                        "and mask pasting instead of the fast equivalents of fast_ops.py (equal up to float rounding, "
                        "slower), or not "
                        "(--no-plain-ops); default: as the run was trained")
    p.add_argument("--workers", type=non_negative_int, default=2, help="data loader worker processes")
    p.add_argument("--results", type=output_file, help="write the COCO results json here")
    p.add_argument("--tta-scales", type=scale_list, default=(),
                   help="test-time augmentation: comma-separated shorter sides added to --min-size's view, e.g. "
                        "400,500,600,700,900,1000,1100,1200 (Detectron's example; the paper gives none); detections "
                        "merged by NMS, masks averaged (tta.py)")
    p.add_argument("--tta-max-size", type=positive_int, default=2000,
                   help="cap on the longer side of the --tta-scales views (Detectron's example: 2000)")
    p.add_argument("--tta-flip", action="store_true",
                   help="test-time augmentation: add the mirror image of every view")
    p.add_argument("--slim-report", action="store_true",
                   help="related work, network slimming (Liu et al. 2017; train.py --slim): instead of evaluating, "
                        "count the channels whose norm scale |gamma| is below --slim-threshold and the parameters "
                        "pruning them would save")
    p.add_argument("--slim-threshold", type=non_negative_float, default=1e-2,
                   help="|gamma| below which --slim-report counts a channel as prunable (default 1e-2; Liu et al. "
                        "Sec. 3.2 prune with a global threshold, a percentile of all the scales)")
    args = p.parse_args(argv)

    if args.slim_report:  # the checkpoint alone: no data set, no processes
        ckpt = read_run(args.checkpoint)
        return print_slimming_report(run_model(args.checkpoint, ckpt, describe_data(args.checkpoint, ckpt)[0]),
                                     args.slim_threshold)
    _, _, device = distributed.init(args.device)  # under torchrun, each process evaluates a shard of the images
    model, dataset = load_run(args.checkpoint, args.data, args.val_ann, args.val_images, args.min_size,
                              args.max_size, plain_ops=args.plain_ops)
    if (args.tta_scales or args.tta_flip) and model.roi_heads.keypoint_head is not None:
        sys.exit("error: --tta-scales/--tta-flip merge boxes and masks; evaluate keypoint models without them")
    if dataset.min_size in args.tta_scales:
        sys.exit(f"error: --tta-scales {dataset.min_size}: the test scale (--min-size) is always a view; list the "
                 f"added scales only")
    try:
        metrics = evaluate(model.to(device), dataset, device, amp=args.amp, workers=args.workers,
                           results_file=args.results, tta_scales=args.tta_scales, tta_flip=args.tta_flip,
                           tta_max_size=args.tta_max_size)
    except data.DataError as e:  # raised in a loader worker: the one line that names the culprit
        sys.exit(f"error: {e.line()}")
    if metrics is not None:  # rank 0: the headline under the tables
        print(summary_line(metrics))
    distributed.cleanup()
    return metrics


if __name__ == "__main__":
    run_script(main)
