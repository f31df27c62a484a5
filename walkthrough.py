"""One image through Mask R-CNN, stage by stage: the data and the figures of walkthrough.ipynb.

gather() runs one image through the model's modules and public functions in the order of the data flow
(backbone -> FPN -> RPN -> RoI heads -> mask head) and returns every intermediate result in a dict; one draw_*
function per stage draws one figure of it on matplotlib axes and returns the data it drew, so that
tests/test_walkthrough.py checks numbers, not pixels. The ground truth and the final detections are drawn by
draw.draw_instances.

    python walkthrough.py --out docs/walkthrough.png     # the overview figure of the README (trains briefly if
                                                         # runs/demo has no checkpoint)

Papers: Faster R-CNN (Ren et al. 2015, arXiv:1506.01497), FPN (Lin et al. 2017, arXiv:1612.03144), Mask R-CNN
(He et al. 2017, arXiv:1703.06870), Group Normalization (Wu & He 2018, arXiv:1803.08494), Rethinking ImageNet
Pre-training (He, Girshick, Dollar 2019, arXiv:1811.08883).
Shapes: L pyramid levels (P2..P6), A anchors per location, T anchors of the image, G ground-truth objects,
R proposals, S sampled RoIs, P positive RoIs, M mask side (28), (h, w) the image, (H, W) the padded batch.
"""
import argparse
import io
import os
import sys

import numpy as np
import torch
from PIL import Image

import checkpoint
import data
import draw
import evaluate
import train
from boxes import IGNORE, NEGATIVE, POSITIVE, batched_nms, clip_boxes
from flags import non_negative_int, output_file, positive_int, run_script
from roi_align import bin_points, level_scales, map_levels, mask_targets, roi_align
from rpn import flatten_predictions

# No matplotlib.use("Agg") here (plot.py's): it would turn off a notebook's inline figures; without a display,
# matplotlib falls back to Agg by itself.
import matplotlib.pyplot as plt
from matplotlib.lines import Line2D
from matplotlib.patches import Patch, Rectangle

LEVEL_COLOURS = plt.get_cmap("tab10").colors  # P2..P6 and ground-truth object k get colour k
RATIO_STYLES = {0.5: ":", 1.0: "-", 2.0: "--"}  # anchors of aspect ratio (h / w) 0.5, 1, 2; others dash-dotted
LABEL_COLOURS = {POSITIVE: "#1a9850", IGNORE: "#fdae61", NEGATIVE: "#4575b4"}  # green / orange / blue
DEMO_CHECKPOINT = os.path.join("runs", "demo", "model_0000400.pth")  # written by `make demo`


def trained_model(demo_checkpoint=DEMO_CHECKPOINT, iters=200, run_dir=os.path.join("runs", "walkthrough")):
    """(model, validation set): the demo's checkpoint when it exists, else a short run of train.py's demo recipe
    (iters iterations, the LR drop at 80%) into run_dir, resumed or reused when run_dir holds it already."""
    path = demo_checkpoint if demo_checkpoint and os.path.isfile(demo_checkpoint) else None
    if path is None:
        train.main(["--device", "cpu", "--output-dir", run_dir, "--max-iters", str(iters), "--no-eval",
                    "--workers", "0", "--resume", "auto"])
        path = checkpoint.latest(run_dir)
    print(f"model: {path}")
    model, dataset = evaluate.load_run(path)
    return model.eval(), dataset


def as_uint8(image):
    """A normalized image (3, h, w) from data.py -> (h, w, 3) uint8, the pixels as they were read."""
    mean, std = torch.tensor(data.IMAGE_MEAN)[:, None, None], torch.tensor(data.IMAGE_STD)[:, None, None]
    return (image * std + mean).clamp(0, 1).mul(255).round().byte().permute(1, 2, 0).numpy()  # (3,h,w) -> (h,w,3)


@torch.no_grad()
def gather(model, dataset, index=0, seed=0):
    """Run image `index` of dataset through the model one stage at a time -> a dict of every intermediate result.

    Inference settings throughout (model.eval()); the two training steps that sample (the RPN's 128 anchors and the
    RoI heads' 64 RoIs) run as in training, on this image's inference proposals, with the torch RNG seeded by seed.
    """
    model.eval()
    torch.manual_seed(seed)
    image, target = dataset[index]
    images, image_sizes, targets = data.collate([(image, target)])  # (1, 3, H, W) padded to multiples of 32
    image_shape = tuple(images.shape[-2:])
    rpn, heads = model.rpn, model.roi_heads

    # Backbone C2..C5 and FPN P2..P6 (FPN Sec. 3)
    features = model.features(images)  # L x (1, C, H/2^k, W/2^k), k = 2..6
    strides = [round(1 / s) for s in level_scales(features, image_shape)]  # 4, 8, 16, 32, 64

    # RPN (Faster R-CNN Sec. 3.1, FPN Sec. 4.1): anchors, their labels, objectness, proposals before/after NMS
    shapes = [tuple(f.shape[-2:]) for f in features]
    anchors = rpn.anchor_generator(image_shape, shapes, images.device, torch.float32)  # L x (h*w*A, 4)
    num_per_level = [a.shape[0] for a in anchors]
    all_anchors = torch.cat(anchors)  # (T, 4)
    anchor_labels, _ = rpn.label_anchors(all_anchors, target["boxes"])  # (T,) 1 / 0 / -1
    sampled_pos, sampled_neg = rpn.sampler(anchor_labels)  # the 128 anchors of this image's RPN loss
    pred_objectness, pred_deltas = rpn.head(features)  # L x (1, A, h, w), L x (1, 4A, h, w)
    objectness, deltas = flatten_predictions(pred_objectness, pred_deltas)  # (1, T), (1, T, 4)
    boxes = rpn.box_coder.decode(deltas[0], all_anchors)  # (T, 4): every anchor moved by its deltas (Eq. 2)
    pre_nms_top_n = rpn.pre_nms_top_n["test"]
    before = [level_logits.topk(min(pre_nms_top_n, level_logits.numel())).indices + start  # top-n of each level
              for level_logits, start in zip(objectness[0].split(num_per_level), np.cumsum([0] + num_per_level))]
    before = torch.cat(before)
    before = before[objectness[0, before].argsort(descending=True)]  # by decreasing score, as the proposals come
    candidates = clip_boxes(boxes[before], image_sizes[0])  # (B, 4)
    # which candidates survive NMS within their level (boxes.batched_nms, as select_proposals runs it)
    level = torch.repeat_interleave(torch.arange(len(anchors)), torch.tensor(num_per_level))[before]  # (B,)
    survivors = batched_nms(candidates, objectness[0, before], level, rpn.nms_thresh)
    proposals = rpn.select_proposals(boxes[None], objectness, image_sizes, num_per_level)  # [(R, 4)] the model's

    # RoI heads (Fast R-CNN Sec. 2; Mask R-CNN Sec. 3): sampled RoIs and their targets, then the mask branch
    rois, roi_labels, matched, _ = heads.sample_rois(proposals, targets)  # [(S, 4)], (S,), [(S,)]
    positive = roi_labels > 0
    pos_rois, pos_labels, pos_gt = rois[0][positive], roi_labels[positive], matched[0][positive]  # (P, 4), (P,), (P,)
    mask_logits = heads.mask_head.logits(features[:4], [pos_rois], image_shape)  # (P, K, M, M)
    M = mask_logits.shape[-1]
    mask_pred = mask_logits[torch.arange(len(pos_labels)), pos_labels].sigmoid()  # (P, M, M): the GT class's mask
    mask_target = mask_targets(target["masks"], pos_rois, pos_gt, M)  # (P, M, M)

    detections = model(images, image_sizes)[0]  # the whole model in one call: boxes, labels, scores, masks
    return {
        "image": as_uint8(image), "image_shape": image_shape, "target": target,
        "class_names": dataset.class_names, "features": [f[0] for f in features], "strides": strides,
        "anchor_sizes": [s[0] for s in rpn.anchor_generator.sizes],
        "aspect_ratios": rpn.anchor_generator.aspect_ratios, "anchors": anchors, "anchor_labels": anchor_labels,
        "sampled_anchors": (sampled_pos, sampled_neg), "fg_iou": rpn.matcher.high_threshold,
        "bg_iou": rpn.matcher.low_threshold,
        "objectness": [torch.sigmoid(o[0]) for o in pred_objectness],  # L x (A, h, w) probabilities
        "before_nms": candidates, "nms_survivors": survivors, "after_nms": proposals[0],
        "nms_thresh": rpn.nms_thresh, "post_nms_top_n": rpn.post_nms_top_n["test"],
        "rois": rois[0], "roi_labels": roi_labels, "roi_matched": matched[0],
        "mask_rois": pos_rois, "mask_labels": pos_labels, "mask_target": mask_target,
        "mask_pred": mask_pred, "detections": detections, "sampling_ratio": heads.sampling_ratio,
        "box_resolution": heads.box_resolution,
    }


def _box(ax, box, colour, **kwargs):
    """One xyxy box as an outline on ax."""
    x1, y1, x2, y2 = (float(v) for v in box)
    ax.add_patch(Rectangle((x1, y1), x2 - x1, y2 - y1, fill=False, edgecolor=colour, **kwargs))


def _gt_boxes(ax, gt_boxes, scale=1.0, colour="black"):
    """The ground-truth boxes (G, 4) as dashed outlines, scaled (e.g. to a feature map's pixels)."""
    for box in gt_boxes:
        _box(ax, box * scale, colour, linewidth=1.5, linestyle="--")


def _faded(ax, image):
    """The image in light grey, so that coloured boxes drawn on it stand out from the coloured shapes."""
    ax.imshow(image.mean(-1), cmap="gray", vmin=-160, vmax=255)  # grey levels in the upper 60%: faded
    h, w = image.shape[:2]
    ax.set_xlim(-0.5, w - 0.5)
    ax.set_ylim(h - 0.5, -0.5)
    ax.set_axis_off()


def draw_anchors(ax, image, anchors, strides, sizes, aspect_ratios):
    """Faster R-CNN Sec. 3.1.1 / FPN Sec. 4.1: the A anchors of each level at the location nearest the image centre,
    one colour per level, on the image (the axes reach out to the largest anchor).
    anchors: L x (h*w*A, 4) as AnchorGenerator gives them. Returns per level {"level", "stride", "centre", "boxes"
    (A, 4), "sizes" (A,) sqrt(area), "ratios" (A,) h / w}."""
    h, w = image.shape[:2]
    _faded(ax, image)
    ax.set_axis_on()  # axes in image pixels
    drawn, extent = [], [0.0, 0.0, float(w), float(h)]
    A = len(aspect_ratios)
    for k, (level_anchors, stride, size) in enumerate(zip(anchors, strides, sizes)):
        cells = level_anchors.view(-1, A, 4)  # (h*w*A, 4) -> (h*w, A, 4): location-major
        centres = (cells[:, 0, :2] + cells[:, 0, 2:]) / 2  # (h*w, 2) every location's centre
        location = ((centres - centres.new_tensor([w / 2, h / 2])) ** 2).sum(1).argmin()  # nearest the image centre
        boxes = cells[location]  # (A, 4)
        for box, ratio in zip(boxes, aspect_ratios):
            _box(ax, box, LEVEL_COLOURS[k], linewidth=1.6, linestyle=RATIO_STYLES.get(ratio, "-."))
        bw, bh = boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]
        drawn.append({"level": f"P{k + 2}", "stride": stride, "centre": centres[location].tolist(), "boxes": boxes,
                      "sizes": torch.sqrt(bw * bh), "ratios": bh / bw})
        extent = [min(extent[0], boxes[:, 0].min().item()), min(extent[1], boxes[:, 1].min().item()),
                  max(extent[2], boxes[:, 2].max().item()), max(extent[3], boxes[:, 3].max().item())]
    ax.add_patch(Rectangle((0, 0), w, h, fill=False, edgecolor="black", linewidth=1))  # the image's border
    ax.set_xlim(extent[0] - 5, extent[2] + 5)
    ax.set_ylim(extent[3] + 5, extent[1] - 5)  # y grows downwards, as in the image
    level_handles = [Line2D([], [], color=LEVEL_COLOURS[k], linewidth=2, label=f"{d['level']}: size {size}, "
                            f"stride {d['stride']}") for k, (d, size) in enumerate(zip(drawn, sizes))]
    ratio_handles = [Line2D([], [], color="grey", linestyle=RATIO_STYLES.get(r, "-."),
                            label=f"h/w = {r:g}") for r in aspect_ratios]
    ax.legend(handles=level_handles + ratio_handles, fontsize=8, loc="center left", bbox_to_anchor=(1.01, 0.5))
    ax.set_title(f"{len(sizes)} levels x {A} aspect ratios = {len(sizes) * A} anchor shapes, each level at its "
                 f"location nearest the image centre\n(the image is the black frame, {w}x{h} px; axes in image pixels)",
                 fontsize=10)
    return drawn


def draw_anchor_labels(ax, image, anchors, labels, gt_boxes, sampled=None, fg_iou=0.7, bg_iou=0.3):
    """Faster R-CNN Sec. 3.1.2: every anchor of every level labelled positive / negative / ignored by its IoU with the
    ground truth. Positive and ignored anchors are outlined, negatives are dots at their centres (there are
    thousands); with sampled = (pos, neg) indices, the anchors of the RPN loss are drawn instead.
    anchors (T, 4), labels (T,). Returns {"positive", "negative", "ignored"} counts of what is drawn."""
    _faded(ax, image)
    anchors = torch.cat(anchors) if isinstance(anchors, (list, tuple)) else anchors  # (T, 4)
    if sampled is not None:
        keep = torch.cat(sampled)
        anchors, labels = anchors[keep], labels[keep]
    counts = {}
    names = {POSITIVE: "positive", NEGATIVE: "negative", IGNORE: "ignored"}
    meaning = {POSITIVE: f"IoU >= {fg_iou:g} or a GT's best", NEGATIVE: f"IoU < {bg_iou:g}",
               IGNORE: f"{bg_iou:g} <= IoU < {fg_iou:g}"}
    handles = []
    for value in (NEGATIVE, IGNORE, POSITIVE):  # positives drawn last, on top
        these = anchors[labels == value]
        counts[names[value]] = len(these)
        colour = LABEL_COLOURS[value]
        if value == NEGATIVE and sampled is None:
            centres = ((these[:, :2] + these[:, 2:]) / 2).unique(dim=0)  # (n, 2): anchors of one location share one
            ax.plot(*centres.T.numpy(), ".", color=colour, markersize=2.5, alpha=0.6)
        else:
            for box in these:
                _box(ax, box, colour, linewidth=2.0 if value == POSITIVE else 0.7,
                     alpha=1.0 if value == POSITIVE else 0.5)
        handles.append(Patch(color=colour, label=f"{names[value]} ({meaning[value]}): {len(these)}"))
    _gt_boxes(ax, gt_boxes)
    handles.append(Line2D([], [], color="black", linestyle="--", label="ground truth"))
    ax.legend(handles=handles, fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.02), ncol=2)
    what = (f"the {sum(counts.values())} anchors sampled for the RPN loss" if sampled is not None else
            f"all {sum(counts.values())} anchors of P2..P6 (negatives: dots at their centres)")
    ax.set_title(what, fontsize=10)
    return counts


def draw_objectness(ax, probs, stride, gt_boxes, level):
    """FPN Sec. 4.1 / Faster R-CNN Sec. 3.1: the RPN's objectness on one level, as a heat map over the level's
    locations: at each location the highest probability of its A anchors. probs (A, h, w) sigmoid probabilities.
    Ground-truth boxes are drawn in the map's pixels (divided by the stride). Returns (the (h, w) map, the image
    handle for a colour bar)."""
    heat = probs.max(0).values  # (A, h, w) -> (h, w)
    handle = ax.imshow(heat.numpy(), cmap="magma", vmin=0, vmax=1)
    _gt_boxes(ax, gt_boxes, scale=1 / stride, colour="white")
    h, w = heat.shape
    ax.set_title(f"{level}: {h}x{w} locations, stride {stride}\nmax {heat.max():.2f}", fontsize=9)
    ax.set_xticks([])
    ax.set_yticks([])
    return heat, handle


def draw_proposals(ax, image, boxes, title, top_k=25, survivors=None):
    """Faster R-CNN Sec. 3.3: boxes (R, 4) by decreasing objectness, the top_k drawn (the best in red). With
    survivors (indices into boxes of those NMS keeps), the others among the top_k are drawn as blue dashed outlines:
    the near-copies NMS removes. Returns {"drawn": (min(R, top_k), 4), "suppressed": how many of them NMS removes}."""
    _faded(ax, image)
    drawn = boxes[:top_k]
    kept = torch.ones(len(drawn), dtype=torch.bool)
    if survivors is not None:
        kept = torch.isin(torch.arange(len(drawn)), survivors)
    colours = plt.get_cmap("autumn")(np.linspace(0, 1, max(len(drawn), 1)))  # red = best .. yellow = worst drawn
    for box, colour, keep in reversed(list(zip(drawn, colours, kept))):  # the best on top
        if keep:
            _box(ax, box, colour, linewidth=1.4)
        else:
            _box(ax, box, "#2166ac", linewidth=1.0, linestyle="--")
    note = f"; blue dashed: {int((~kept).sum())} that NMS removes" if survivors is not None else ""
    ax.set_title(f"{title}: {len(boxes)} boxes\n(the best {len(drawn)} drawn, red = highest objectness{note})",
                 fontsize=9)
    return {"drawn": drawn, "suppressed": int((~kept).sum())}


def draw_sampled_rois(ax, image, rois, labels, matched, gt_boxes, class_names):
    """Fast R-CNN Sec. 2.3 / Mask R-CNN Sec. 3.1: the RoIs sampled for the box head's loss. Each positive RoI
    (IoU >= 0.5 with a GT box) in the colour of the GT box it is matched to, which is drawn thick and dashed;
    negatives (background) faint grey. rois (S, 4), labels (S,) class or 0, matched (S,) GT index.
    Returns {"positive": P, "negative": S - P, "pairs": [(roi, its GT box)]}."""
    _faded(ax, image)
    positive = labels > 0
    for box in rois[~positive]:
        _box(ax, box, "dimgrey", linewidth=0.6, alpha=0.5)
    pairs = []
    for box, gt in zip(rois[positive], matched[positive]):
        _box(ax, box, LEVEL_COLOURS[int(gt) % 10], linewidth=1.0, alpha=0.9)
        pairs.append((box, gt_boxes[gt]))
    handles = [Line2D([], [], color="dimgrey", label=f"negative (background, IoU < 0.5): {int((~positive).sum())}")]
    for g in matched[positive].unique().tolist():
        _box(ax, gt_boxes[g], LEVEL_COLOURS[g % 10], linewidth=2.5, linestyle="--")
        on_g = matched[positive] == g  # the positive RoIs of GT box g, which all learn its class
        name = class_names[int(labels[positive][on_g][0]) - 1]
        handles.append(Line2D([], [], color=LEVEL_COLOURS[g % 10],
                              label=f"positive for GT {g} ({name}): {int(on_g.sum())} RoIs"))
    ax.legend(handles=handles, fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.02), ncol=2)
    ax.set_title(f"{len(rois)} sampled RoIs: {int(positive.sum())} positive, {int((~positive).sum())} negative\n"
                 "(thick dashed: the GT box a positive RoI learns to regress to)", fontsize=9)
    return {"positive": int(positive.sum()), "negative": int((~positive).sum()), "pairs": pairs}


def roi_align_points(roi, features, strides, resolution=7, sampling_ratio=2):
    """Where RoIAlign (Mask R-CNN Fig. 3) reads one RoI (4,) in image pixels: its FPN level k (FPN Eq. 1) and, in the
    pixels of P_k (features[k - 2], (C, H, W)), the RoI and the sampling_ratio x sampling_ratio points of each of its
    resolution^2 bins (roi_align.bin_points, aligned=False). Returns {"level" k, "stride", "feature" P_k, "box" on
    the map (4,), "ys" and "xs" (resolution, sampling_ratio) point coordinates, "pooled" (resolution, resolution)
    RoIAlign's output averaged over channels, i.e. RoIAlign of P_k's mean over channels (it is linear)}."""
    level = int(map_levels(roi[None])[0])
    stride, feature = strides[level - 2], features[level - 2]
    x1, y1, x2, y2 = (float(c) / stride for c in roi)
    w, h = max(x2 - x1, 1.0), max(y2 - y1, 1.0)  # aligned=False: sides at least one map pixel
    ys = bin_points(y1, h, resolution, sampling_ratio)  # (7, 2)
    xs = bin_points(x1, w, resolution, sampling_ratio)  # (7, 2)
    rois = torch.cat([roi.new_zeros(1), roi])[None]  # (1, 5): image 0
    pooled = roi_align(feature[None], rois, resolution, 1 / stride, sampling_ratio)[0].mean(0)  # (C, 7, 7) -> (7, 7)
    return {"level": level, "stride": stride, "feature": feature, "box": (x1, y1, x1 + w, y1 + h), "ys": ys, "xs": xs,
            "pooled": pooled}


def draw_roi_align_points(ax, points, margin=3):
    """The map P_k around one RoI (its mean over channels), with the RoI (red), its bins (gold lines)
    and the sampling points of every bin (cyan dots) that RoIAlign bilinearly interpolates and averages, as
    roi_align_points gives them. A map pixel i is centred on coordinate i, as RoIAlign reads it.
    Returns the points drawn, (resolution^2 * sampling_ratio^2, 2) as (x, y) in map pixels."""
    x1, y1, x2, y2 = points["box"]
    ax.imshow(points["feature"].mean(0).numpy(), cmap="gray")
    bins_y, bins_x = points["ys"].shape[0], points["xs"].shape[0]
    for i in range(bins_x + 1):  # bin edges
        x = x1 + i * (x2 - x1) / bins_x
        ax.plot([x, x], [y1, y2], color="gold", linewidth=0.8)
    for i in range(bins_y + 1):
        y = y1 + i * (y2 - y1) / bins_y
        ax.plot([x1, x2], [y, y], color="gold", linewidth=0.8)
    ax.add_patch(Rectangle((x1, y1), x2 - x1, y2 - y1, fill=False, edgecolor="red", linewidth=2))
    yy, xx = torch.meshgrid(points["ys"].flatten(), points["xs"].flatten(), indexing="ij")  # every point, all bins
    xy = torch.stack([xx.flatten(), yy.flatten()], dim=1)  # (7*2 * 7*2, 2)
    ax.plot(*xy.T.numpy(), ".", color="cyan", markersize=3)
    ax.set_xlim(x1 - margin, x2 + margin)
    ax.set_ylim(y2 + margin, y1 - margin)
    s, g = bins_x, points["xs"].shape[1]
    ax.legend(handles=[Line2D([], [], color="red", label="the RoI, not rounded to the pixel grid"),
                       Line2D([], [], color="gold", label=f"{s}x{s} bins"),
                       Line2D([], [], color="cyan", marker=".", linestyle="", label=f"{g}x{g} sample points per bin")],
              fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.02), ncol=1)
    ax.set_title(f"P{points['level']} (stride {points['stride']}, FPN Eq. 1), in its pixels", fontsize=9)
    return xy


def draw_roi_align(axes, image, roi, points):
    """Three panels: the RoI (4,) on the image; draw_roi_align_points; RoIAlign's 7x7 output (the mean over
    channels), each cell the average of its bin's sample points. Returns the points drawn."""
    _faded(axes[0], image)
    _box(axes[0], roi, "red", linewidth=2)
    axes[0].set_title(f"the RoI in the image: {roi[2] - roi[0]:.1f} x {roi[3] - roi[1]:.1f} px", fontsize=9)
    xy = draw_roi_align_points(axes[1], points)
    mean = points["feature"].mean(0)  # (H, W): the same grey scale as the map's
    axes[2].imshow(points["pooled"].numpy(), cmap="gray", vmin=mean.min().item(), vmax=mean.max().item())
    axes[2].set_title("RoIAlign's 7x7 output (mean over channels):\none value per bin", fontsize=9)
    axes[2].set_xticks([])
    axes[2].set_yticks([])
    return xy


def draw_mask_targets(axes, image, rois, targets, preds, labels, class_names):
    """Mask R-CNN Sec. 3: for the positive RoIs (R, 4), one column each: the image inside the RoI, the 28x28 mask
    target (the matched GT mask cut out by the RoI, roi_align.mask_targets) and the mask predicted for the GT
    class (sigmoid). axes: (3, n) for the first n RoIs. Returns {"targets", "preds"}, the (n, M, M) drawn."""
    n = axes.shape[1]
    for j in range(n):
        top, middle, bottom = axes[:, j]
        if j >= len(rois):  # fewer positives than columns
            for ax in axes[:, j]:
                ax.set_axis_off()
            continue
        x1, y1, x2, y2 = rois[j].tolist()
        top.imshow(image)
        top.set_xlim(x1, x2)
        top.set_ylim(y2, y1)
        top.set_aspect("auto")  # the RoI stretched to a square, as RoIAlign stretches it to 28x28
        top.set_title(f"RoI {j}: {class_names[int(labels[j]) - 1]}", fontsize=9)
        middle.imshow(targets[j].numpy(), cmap="gray", vmin=0, vmax=1)
        bottom.imshow(preds[j].numpy(), cmap="gray", vmin=0, vmax=1)
        for ax in (top, middle, bottom):
            ax.set_xticks([])
            ax.set_yticks([])
    axes[0, 0].set_ylabel("image in the RoI", fontsize=9)
    axes[1, 0].set_ylabel("target 28x28", fontsize=9)
    axes[2, 0].set_ylabel("predicted 28x28", fontsize=9)
    return {"targets": targets[:n], "preds": preds[:n]}


@torch.no_grad()
def norm_statistics(model, dataset, indices=(1, 2, 3, 4)):
    """GN's and BN's statistics of one feature map: the stem conv's output x (N, C, H/2, W/2) on the images of
    `indices` (the input of the stem's GN), and on the first of them alone (a batch of 1).
    GN (Wu & He 2018, Eq. 2 with S_i of Eq. 7): mean and variance per image and group of C/G channels.
    BN (Eq. 2 with S_i of Eq. 3): mean and variance per channel over the images of the batch.
    Returns {"batch", "single"}, each {"gn_mean", "gn_var"} (N, G) and {"bn_mean", "bn_var"} (C,)."""
    images, _, _ = data.collate([dataset[i] for i in indices])  # (N, 3, H, W)
    num_groups = model.backbone.bn1.num_groups
    stats = {}
    for name, batch in (("batch", images), ("single", images[:1])):
        x = model.backbone.conv1(batch)  # (N, C, H/2, W/2)
        groups = x.unflatten(1, (num_groups, -1))  # (N, G, C/G, H/2, W/2)
        stats[name] = {"gn_mean": groups.mean((2, 3, 4)), "gn_var": groups.var((2, 3, 4), unbiased=False),
                       "bn_mean": x.mean((0, 2, 3)), "bn_var": x.var((0, 2, 3), unbiased=False)}
    return stats


def draw_norm_statistics(axes, stats):
    """Three panels: GN's mean of every (image, group) of the batch; image 0's GN means computed in the batch and
    alone (the same: GN does not look at the other images); BN's per-channel means in the batch and of image 0
    alone (different: BN's statistics are the batch's). Returns the values drawn in panels 2 and 3."""
    batch, single = stats["batch"], stats["single"]
    gn = axes[0].imshow(batch["gn_mean"].numpy(), cmap="viridis")
    N, G = batch["gn_mean"].shape
    axes[0].set_xticks(range(G))
    axes[0].set_yticks(range(N))
    axes[0].set_xlabel("group")
    axes[0].set_ylabel("image of the batch")
    axes[0].set_title(f"GN: a mean per image and group\n({N} images x {G} groups)", fontsize=9)
    plt.colorbar(gn, ax=axes[0], fraction=0.046, label="mean")
    panels = []
    for ax, key, title, xlabel in ((axes[1], "gn_mean", "GN: image 0's mean per group", "group"),
                                   (axes[2], "bn_mean", "BN: the batch's mean per channel", "channel")):
        in_batch = batch[key][0] if key == "gn_mean" else batch[key]  # image 0's groups, or the batch's channels
        alone = single[key][0] if key == "gn_mean" else single[key]
        index = np.arange(len(in_batch))
        ax.bar(index, in_batch.numpy(), color="#9ecae1", label=f"batch of {N}")
        ax.plot(index, alone.numpy(), "o", color="#d95f02", markersize=5, label="batch of 1 (image 0 alone)")
        ax.set_xticks(index)
        ax.set_xlabel(xlabel)
        ax.set_ylabel("mean")
        change = (in_batch - alone).abs().max()
        ax.set_title(f"{title},\nbatch of {N} vs 1: largest difference {change:.3g}", fontsize=9)
        ax.legend(fontsize=7)
        panels.append({"batch": in_batch, "single": alone})
    return panels


def draw_overview(stages, out, score_thresh=0.5):
    """A 2x4 summary of the walkthrough for the README, with short titles: the ground truth, anchors, anchor labels,
    objectness on the most confident level; proposals before NMS, sampled RoIs, RoIAlign's sample points, and the
    detections scoring at least score_thresh. Writes out (PNG) and returns its path."""
    fig, axes = plt.subplots(2, 4, figsize=(20, 9.5), layout="constrained")
    image, target, strides = stages["image"], stages["target"], stages["strides"]
    names = stages["class_names"]
    draw.draw_instances(axes[0, 0], image, target["boxes"], target["labels"], names, masks=target["masks"])
    draw_anchors(axes[0, 1], image, stages["anchors"], strides, stages["anchor_sizes"], stages["aspect_ratios"])
    counts = draw_anchor_labels(axes[0, 2], image, stages["anchors"], stages["anchor_labels"], target["boxes"],
                                fg_iou=stages["fg_iou"], bg_iou=stages["bg_iou"])
    k = int(torch.stack([p.max() for p in stages["objectness"]]).argmax())
    _, handle = draw_objectness(axes[0, 3], stages["objectness"][k], strides[k], target["boxes"], f"P{k + 2}")
    fig.colorbar(handle, ax=axes[0, 3], fraction=0.04, label="objectness")
    proposals = draw_proposals(axes[1, 0], image, stages["before_nms"], "proposals before NMS",
                               survivors=stages["nms_survivors"])
    rois = draw_sampled_rois(axes[1, 1], image, stages["rois"], stages["roi_labels"], stages["roi_matched"],
                             target["boxes"], names)
    points = roi_align_points(stages["mask_rois"][0], stages["features"], strides)
    draw_roi_align_points(axes[1, 2], points)
    det = stages["detections"]
    keep = det["scores"] >= score_thresh
    draw.draw_instances(axes[1, 3], image, det["boxes"][keep], det["labels"][keep], names,
                        scores=det["scores"][keep], masks=det["masks"][keep, 0] > 0.5, score_thresh=score_thresh,
                        best_score=det["scores"].max().item() if len(keep) else None)
    titles = [f"0. the input and its ground truth: {len(target['boxes'])} objects",
              "1. anchors of P2..P6 at one centre (FPN 4.1)",
              f"2. anchor labels (Faster R-CNN 3.1.2): {counts['positive']} positive,\n{counts['ignored']} ignored, "
              f"{counts['negative']} negative",
              f"3. RPN objectness on P{k + 2} (Faster R-CNN 3.1)",
              f"4. RPN proposals (Faster R-CNN 3.3): the best {len(proposals['drawn'])} of "
              f"{len(stages['before_nms'])};\nblue dashed: removed by NMS",
              f"5. sampled RoIs (Fast R-CNN 2.3): {rois['positive']} positive, {rois['negative']} negative;\n"
              "thick dashed: the GT box of the positives",
              f"6. RoIAlign (Mask R-CNN Fig. 3): 7x7 bins x 2x2 points on P{points['level']}",
              f"7. detections scoring >= {score_thresh:g}: {int(keep.sum())} of {len(keep)},\nmasks pasted "
              "(Mask R-CNN 3.1)"]
    for ax, title in zip(axes.flat, titles):
        ax.set_title(title, fontsize=10, loc="center")
    fig.suptitle("One image through Mask R-CNN (walkthrough.ipynb)", fontsize=13)
    buffer = io.BytesIO()
    fig.savefig(buffer, dpi=64)
    plt.close(fig)
    # 256 colours: a third of the bytes, for a figure committed to the repository
    Image.open(buffer).convert("RGB").quantize(colors=256).save(out, optimize=True)
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=output_file, default=os.path.join("docs", "walkthrough.png"),
                   help="the overview PNG to write")
    p.add_argument("--checkpoint", help=f"a train.py checkpoint (default: {DEMO_CHECKPOINT} when `make demo` has "
                                        f"run, else a short run of --iters iterations)")
    p.add_argument("--iters", type=positive_int, default=200,
                   help="iterations of the short run when there is no checkpoint")
    p.add_argument("--index", type=non_negative_int, default=3, help="the validation image to follow (the notebook's)")
    args = p.parse_args(argv)
    if not args.out.lower().endswith(".png"):
        p.error(f"argument --out: {args.out}: the overview is a PNG file (.png)")
    if args.checkpoint and not os.path.isfile(args.checkpoint):
        sys.exit(f"error: --checkpoint {args.checkpoint} does not exist")
    model, dataset = trained_model(args.checkpoint or DEMO_CHECKPOINT, args.iters)
    if args.index >= len(dataset):
        sys.exit(f"error: --index {args.index}: the validation set has {len(dataset)} images")
    print(f"wrote {draw_overview(gather(model, dataset, args.index), args.out)}")


if __name__ == "__main__":
    run_script(main)
