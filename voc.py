"""PASCAL VOC evaluation: VOC mAP at IoU 0.5, area and 11-point (the VOC reader is data.VOCDataset).

Rethinking ImageNet Pre-training (arXiv:1811.08883) Sec. 5.2: Faster R-CNN R101-FPN + GN (preset r101_fpn_gn_faster)
trained on VOC2007 trainval + VOC2012 train and evaluated on VOC2012 val: 82.7 mAP pre-trained (18k iterations)
against 77.6 from scratch (144k), which does not catch up.
Metric: Everingham et al., "The PASCAL Visual Object Classes (VOC) Challenge" (IJCV 2010) Sec. 4.2 (11-point AP,
VOC2007); from VOC2010 on, the devkit takes the area under the interpolated precision/recall curve instead.
Objects marked "difficult" count as "ignore": neither found nor missed.

Shapes: D detections of one class over all images, D_i detections and G ground-truth boxes of one image.
"""
import numpy as np
import torch

from boxes import box_iou


def voc_ap(recall, precision, use_07_metric=False):
    """Average precision of one class from its cumulative recall and precision (D,) in detection-score order.

    VOC2010 and later (the default): the area under the interpolated precision/recall curve, where the
    interpolated precision at recall r is the highest precision at any recall >= r.
    use_07_metric: VOC2007's 11-point AP, the mean over t = 0, 0.1, ..., 1 of the highest precision at recall >= t
    (0 where recall never reaches t).
    """
    recall, precision = np.asarray(recall, np.float64), np.asarray(precision, np.float64)
    if use_07_metric:
        # The thresholds of Detectron's voc_eval (py-faster-rcnn's, the paper's code): np.arange(0, 1.1, 0.1), whose
        # 4th is 3 * 0.1 = 0.30000000000000004, so a recall of exactly 0.3 does not reach it.
        return float(np.mean([precision[recall >= t].max(initial=0.0) for t in np.arange(0.0, 1.1, 0.1)]))
    r = np.concatenate([[0.0], recall, [1.0]])  # sentinels: the curve starts at recall 0, ends at recall 1 ...
    p = np.concatenate([[0.0], precision, [0.0]])  # ... with precision 0 beyond the last detection
    p = np.maximum.accumulate(p[::-1])[::-1]  # interpolate: p(r) = max over r' >= r of p(r')
    steps = np.flatnonzero(r[1:] != r[:-1])  # where recall increases
    return float(np.sum((r[steps + 1] - r[steps]) * p[steps + 1]))  # area: sum of width x height of each step


def voc_eval(annotations, results, categories, iou_threshold=0.5, use_07_metric=False):
    """VOC detection AP per class and its mean (the paper's VOC "mAP" is this at iou_threshold 0.5).

    annotations: COCO-style ground truth {"image_id", "category_id", "bbox" [x, y, w, h], "difficult" (optional)};
    results: COCO results {"image_id", "category_id", "bbox" [x, y, w, h], "score"}; categories: [{"id", "name"}].
    Returns ({class name: AP}, mean AP). A class with no non-difficult ground truth has AP nan and is left out of
    the mean (its recall is undefined; COCOeval likewise skips categories without ground truth).

    Matching (VOC devkit, VOCevaldet.m): detections in decreasing score order; each is compared with the ground
    truth box of its class in its image that overlaps it most, difficult ones included. IoU >= iou_threshold with a
    difficult box: ignored (neither true nor false positive); with a box not matched yet: a true positive, and the
    box is taken; with a taken box: a false positive (a duplicate). Below the threshold: a false positive.
    Unlike COCOeval, a duplicate does not fall back to the next best unmatched box. IoU here is that of continuous
    boxes; with data.read_voc_annotation's conversion it equals the devkit's "+1" IoU on the 1-based inclusive boxes.
    (py-faster-rcnn and Detectron2 test IoU > 0.5; the devkit, followed here, tests >= 0.5.)
    """
    gts = {}  # image id -> [(category id, [x1, y1, x2, y2], difficult)]
    for ann in annotations:
        x, y, w, h = ann["bbox"]
        gts.setdefault(ann["image_id"], []).append((ann["category_id"], [x, y, x + w, y + h],
                                                    bool(ann.get("difficult", 0))))
    # Each detection's most overlapping ground-truth box of its own class in its image: IoU and index, (D,) each.
    best_iou, best_gt = np.full(len(results), -1.0), np.zeros(len(results), np.int64)
    per_image, per_category = {}, {}  # indices into results
    for i, r in enumerate(results):
        per_image.setdefault(r["image_id"], []).append(i)
        per_category.setdefault(r["category_id"], []).append(i)
    for image_id, indices in per_image.items():
        if image_id not in gts:
            continue  # no ground truth at all: IoU stays -1, every detection is a false positive
        gt_classes = np.array([c for c, _, _ in gts[image_id]])  # (G,)
        gt_boxes = torch.tensor([b for _, b, _ in gts[image_id]], dtype=torch.float64)  # (G, 4)
        det_classes = np.array([results[i]["category_id"] for i in indices])  # (D_i,)
        det_boxes = torch.tensor([results[i]["bbox"] for i in indices], dtype=torch.float64)  # (D_i, 4) xywh
        det_boxes[:, 2:] += det_boxes[:, :2]  # -> xyxy
        ious = box_iou(det_boxes, gt_boxes).numpy()  # (D_i, G)
        ious[det_classes[:, None] != gt_classes[None, :]] = -1.0  # only boxes of the detection's class
        best_iou[indices], best_gt[indices] = ious.max(axis=1), ious.argmax(axis=1)

    aps = {}
    for category in categories:
        num_positives = sum(c == category["id"] and not difficult  # the difficult ones need not be found
                            for objects in gts.values() for c, _, difficult in objects)
        # decreasing score; the sort is stable, so equal scores keep their input order
        order = sorted(per_category.get(category["id"], []), key=lambda i: -results[i]["score"])
        taken = set()  # (image id, ground-truth index) already found
        tp, fp = np.zeros(len(order)), np.zeros(len(order))  # (D,) each
        for d, i in enumerate(order):
            found = (results[i]["image_id"], int(best_gt[i]))
            if best_iou[i] < iou_threshold:
                fp[d] = 1
            elif gts[found[0]][found[1]][2]:
                continue  # matched a difficult object: ignored
            elif found in taken:
                fp[d] = 1  # a second detection of an object already found
            else:
                tp[d] = 1
                taken.add(found)
        if num_positives == 0:
            aps[category["name"]] = float("nan")
            continue
        tp, fp = np.cumsum(tp), np.cumsum(fp)
        recall, precision = tp / num_positives, tp / np.maximum(tp + fp, np.finfo(np.float64).eps)
        aps[category["name"]] = voc_ap(recall, precision, use_07_metric)
    defined = [ap for ap in aps.values() if not np.isnan(ap)]
    return aps, float(np.mean(defined)) if defined else float("nan")


def voc_metrics(dataset, results, iou_threshold=0.5, out=None):
    """evaluate.py's VOC numbers for a VOCDataset: {"voc/mAP50" (VOC2010+ area), "voc/mAP50_11pt" (VOC2007),
    "voc/AP50/<class>"}, printed as a per-class table into the stream out (None: stdout). Classes without ground
    truth are left out."""
    image_ids = set(dataset.image_ids)
    annotations = [a for a in dataset.coco.dataset["annotations"] if a["image_id"] in image_ids]
    results = [r for r in results if r["image_id"] in image_ids]
    categories = dataset.coco.dataset["categories"]
    aps, mean = voc_eval(annotations, results, categories, iou_threshold)
    aps_07, mean_07 = voc_eval(annotations, results, categories, iou_threshold, use_07_metric=True)
    print(f"--- VOC AP at IoU {iou_threshold:g} (area / 11-point) ---", file=out)
    for name, ap in aps.items():
        if not np.isnan(ap):
            print(f"{name:>12s}  {100 * ap:5.1f} / {100 * aps_07[name]:5.1f}", file=out)
    print(f"{'mAP':>12s}  {100 * mean:5.1f} / {100 * mean_07:5.1f}", file=out)
    tag = f"{round(100 * iou_threshold)}"
    metrics = {f"voc/mAP{tag}": mean, f"voc/mAP{tag}_11pt": mean_07}
    metrics.update({f"voc/AP{tag}/{name}": ap for name, ap in aps.items() if not np.isnan(ap)})
    return metrics
