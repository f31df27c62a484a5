"""Drawing instances on an image: one colour per instance, translucent masks with their outlines, boxes, keypoints
joined by their skeleton, and a "name 0.93" label per instance that stays inside the image.

plot.py predictions (ground truth next to detections) and predict.py (a checkpoint on your own images) draw with it;
so can a notebook:

    fig, axes = draw.figure(h, w, panels=2, zoom=2)          # or any matplotlib axes
    draw.draw_instances(axes[0], image, gt_boxes, gt_labels, class_names, title="ground truth")
    draw.draw_instances(axes[1], image, out["boxes"], out["labels"], class_names, scores=out["scores"],
                        masks=out["masks"][:, 0] > 0.5, title="predictions", score_thresh=0.5, best_score=0.31)

Shapes: D instances, (H, W) the image, J keypoints; boxes (D, 4) as (x1, y1, x2, y2) in image pixels, where pixel
(i, j) covers [j, j + 1] x [i, i + 1] (the image is shown with that extent, so boxes, masks and keypoints line up).
The panel's title goes above the image (the axes title): labels never cover it, and draw.figure leaves room for it.
"""
import numpy as np
import torch

import matplotlib.pyplot as plt  # the caller's backend: plot.py's files (Agg), or a notebook's inline figures
from matplotlib.patches import Rectangle

# 20 colours that tell instances apart: tab20's ten strong ones, then its ten light ones; they repeat after 20.
PALETTE = plt.get_cmap("tab20").colors[0::2] + plt.get_cmap("tab20").colors[1::2]
FONT_SIZE = 7  # points
LABEL_PAD = 1.5  # points of label background around the text
MASK_ALPHA = 0.4
TITLE_PX = 18  # pixels above the image that draw.figure leaves for the title


def instance_colours(n):
    """n RGB colours, one per instance, in PALETTE's order: neighbours of the same class still look different."""
    return [PALETTE[i % len(PALETTE)] for i in range(n)]


def label_position(box, image_size, text_size, taken=()):
    """Top-left corner (x, y) of a label of text_size (w, h) for box (x1, y1, x2, y2) in an image_size (H, W) image,
    all in image pixels: just above the box, or inside its top edge when the image ends above the box; moved left so
    that it does not pass the right edge. A label that would cover one already placed ((x, y, w, h) in taken) moves
    down a line at a time while the image lasts."""
    (x1, y1, _, _), (H, W), (w, h) = box, image_size, text_size
    x = max(min(x1, W - w), 0)
    y = y1 - h if y1 - h >= 0 else max(y1, 0)
    first = y = min(y, H - h)  # a box at the bottom edge: its label still inside the image
    while any(x < tx + tw and tx < x + w and y < ty + th and ty < y + h for tx, ty, tw, th in taken):
        y += h
        if y + h > H:  # no free line below: overlap where the label belongs
            return x, max(first, 0)
    return x, max(y, 0)


def empty_note(scores, score_thresh=None, best_score=None):
    """What a panel without instances says: ground truth (scores None) has no objects; detections name the
    threshold and the best score below it."""
    if scores is None:
        return "no objects"
    if score_thresh is None or best_score is None:  # the model found nothing at all
        return "no detections"
    return f"no detection scored >= {score_thresh:.2f}\n(best: {best_score:.2f})"


def figure(height, width, panels=1, zoom=1, dpi=100):
    """A figure of `panels` images side by side, each (height, width) pixels times zoom, under a band of TITLE_PX
    pixels for their titles. Returns (fig, axes); saved with savefig(dpi=dpi) it is exactly that many pixels."""
    h, w = height * zoom, width * zoom
    fig, axes = plt.subplots(1, panels, figsize=(panels * w / dpi, (h + TITLE_PX) / dpi), dpi=dpi, squeeze=False)
    fig.subplots_adjust(left=0, right=1, bottom=0, top=h / (h + TITLE_PX), wspace=0)
    return fig, axes[0]


def save(fig, path):
    """Write fig to path at its own dpi (draw.figure's exact pixel size) and free it."""
    fig.savefig(path, dpi=fig.dpi)
    plt.close(fig)


def _numpy(x):
    """A tensor (any device), array or list as a numpy array."""
    return torch.as_tensor(x).detach().cpu().numpy()


def _add_label(ax, text, box, image_size, colour, taken):
    """Write text on a background of the instance's colour at label_position, clear of the labels taken; returns its
    (x, y, w, h) in image pixels. The text is measured by the figure's renderer, so set the figure's size and layout
    before drawing."""
    label = ax.text(0, 0, text, fontsize=FONT_SIZE, ha="left", va="top", zorder=4,
                    color="black" if np.dot(colour, (0.299, 0.587, 0.114)) > 0.6 else "white",  # readable on it
                    bbox=dict(facecolor=colour, alpha=0.85, pad=LABEL_PAD, edgecolor="none"))
    extent = label.get_window_extent(ax.figure.canvas.get_renderer())  # the text alone, in screen pixels
    (x0, y0), (x1, y1) = ax.transData.transform([(0, 0), (1, 1)])
    per_pixel = abs(x1 - x0), abs(y1 - y0)  # screen pixels per image pixel, x and y
    pad = LABEL_PAD * ax.figure.dpi / 72  # points -> screen pixels
    w, h = (extent.width + 2 * pad) / per_pixel[0], (extent.height + 2 * pad) / per_pixel[1]
    x, y = label_position(box, image_size, (w, h), taken)
    label.set_position((x + pad / per_pixel[0], y + pad / per_pixel[1]))  # the text sits inside its padding
    return x, y, w, h


def draw_instances(ax, image, boxes, labels, class_names, scores=None, masks=None, keypoints=None,
                   skeleton=None, title=None, score_thresh=None, best_score=None, notes=None):
    """Draw D instances on image (H, W, 3) uint8 in ax. boxes (D, 4) xyxy; labels (D,) contiguous 1..K-1, named
    class_names[label - 1]; scores (D,) for detections, None for ground truth; notes (D,) words added to each
    instance's label, e.g. "(crowd)", or None; masks (D, H, W) binary; keypoints
    (D, J, 3) as (x, y, v) drawn where v > 0 (ground truth: the labelled ones; the model's detections carry v = 1,
    so all of them are drawn, as Detectron does), joined by the skeleton's 0-based pairs (j1, j2).
    With D == 0 a note on the image says so, for detections with score_thresh and best_score (empty_note).
    Labels are placed in the given order (detections: best score first), each clear of the ones before if it can be.
    Returns {"colours": the RGB of each instance, "labels": [(text, (x, y, w, h))] each label's rectangle in image
    pixels, "limbs": [(instance, j1, j2)] the skeleton lines drawn, "note": the note, or None}."""
    H, W = image.shape[:2]
    boxes = _numpy(boxes).reshape(-1, 4)  # (D, 4), also for an empty list
    labels = _numpy(labels).reshape(-1)  # (D,)
    colours = instance_colours(len(boxes))
    ax.imshow(image, extent=(0, W, H, 0))
    ax.set(xlim=(0, W), ylim=(H, 0))  # fixed now: labels are measured in image pixels, and keypoints may lie outside
    if masks is not None and len(boxes):
        masks = _numpy(masks).astype(bool)  # (D, H, W)
        overlay = np.zeros((H, W, 4))  # (H, W, RGBA): all masks, later ones on top
        for mask, colour in zip(masks, colours):
            overlay[mask] = (*colour, MASK_ALPHA)
        ax.imshow(overlay, extent=(0, W, H, 0))
        centres_x, centres_y = np.arange(W + 2) - 0.5, np.arange(H + 2) - 0.5  # of the padded mask's pixels
        for mask, colour in zip(masks, colours):
            if mask.any():  # the outline is the mask's 0.5 level; a zero border closes it at the image's edge
                ax.contour(centres_x, centres_y, np.pad(mask, 1).astype(float), levels=[0.5], colors=[colour],
                           linewidths=1.2)
    limbs = []
    if keypoints is not None and len(boxes):
        for d, (points, colour) in enumerate(zip(_numpy(keypoints), colours)):  # points (J, 3)
            shown = points[:, 2] > 0
            for j1, j2 in skeleton or []:
                if shown[j1] and shown[j2]:
                    ax.plot(points[[j1, j2], 0], points[[j1, j2], 1], color=colour, linewidth=1.5, zorder=2)
                    limbs.append((d, j1, j2))
            ax.scatter(points[shown, 0], points[shown, 1], s=9, color=colour, edgecolors="white", linewidths=0.5,
                       zorder=3)
    placed = []
    for d, ((x1, y1, x2, y2), label, colour) in enumerate(zip(boxes, labels, colours)):
        ax.add_patch(Rectangle((x1, y1), x2 - x1, y2 - y1, fill=False, edgecolor=colour, linewidth=1.5))
        text = class_names[label - 1] + ("" if scores is None else f" {float(scores[d]):.2f}")
        text += f" {notes[d]}" if notes is not None and notes[d] else ""
        placed.append((text, _add_label(ax, text, (x1, y1, x2, y2), (H, W), colour, [r for _, r in placed])))
    note = None
    if not len(boxes):
        note = empty_note(scores, score_thresh, best_score)
        ax.text(W / 2, H / 2, note, fontsize=FONT_SIZE + 1, ha="center", va="center", color="white",
                multialignment="center", bbox=dict(facecolor="black", alpha=0.6, pad=3, edgecolor="none"))
    if title:
        ax.set_title(title, fontsize=FONT_SIZE + 1, loc="left", pad=3)
    ax.set_axis_off()
    return {"colours": colours, "labels": placed, "limbs": limbs, "note": note}
