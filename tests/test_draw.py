"""draw.py: colours per instance, labels kept inside the image, the note of an empty panel, the skeleton's lines."""
import numpy as np
import pytest
import torch

import draw

H, W = 60, 80
IMAGE = np.zeros((H, W, 3), np.uint8)


def panel(**kw):
    """One drawn panel on a draw.figure at zoom 2; returns (what draw_instances returns, the axes)."""
    fig, (ax,) = draw.figure(H, W, zoom=2)
    kw = {"boxes": [], "labels": [], "class_names": ["cat", "dog"], **kw}
    drawn = draw.draw_instances(ax, IMAGE, **kw)
    draw.plt.close(fig)
    return drawn, ax


def inside(rect):
    x, y, w, h = rect
    return 0 <= x and 0 <= y and x + w <= W + 1e-6 and y + h <= H + 1e-6


def test_every_instance_has_its_own_colour():
    colours = draw.instance_colours(20)
    assert len(set(colours)) == 20
    drawn, _ = panel(boxes=[[5, 5, 20, 20], [30, 30, 50, 50], [10, 35, 25, 55]], labels=[1, 1, 1])
    assert len(set(drawn["colours"])) == 3                                   # three cats, three colours


def test_label_goes_above_the_box_or_inside_it_at_the_top_edge_and_left_of_the_right_edge():
    assert draw.label_position((10, 30, 40, 50), (H, W), (20, 8)) == (10, 22)       # room above: on top of the box
    assert draw.label_position((10, 3, 40, 50), (H, W), (20, 8)) == (10, 3)         # none: inside the box's top
    assert draw.label_position((70, 30, 80, 50), (H, W), (20, 8)) == (60, 22)       # ends at the right edge
    assert draw.label_position((10, 58, 40, 60), (H, W), (20, 8)) == (10, 50)       # above the bottom edge
    assert draw.label_position((10, 30, 40, 50), (H, W), (20, 8), taken=[(5, 20, 20, 8)]) == (10, 30)  # a line down


def test_labels_of_boxes_at_the_edges_stay_inside_the_image():
    boxes = torch.tensor([[0.0, 0, 30, 20], [72, 0, 80, 25], [60, 45, 80, 60]])  # top-left, top-right, bottom-right
    drawn, ax = panel(boxes=boxes, labels=torch.tensor([1, 2, 1]), scores=torch.tensor([0.93, 0.8, 0.61]))
    assert [text for text, _ in drawn["labels"]] == ["cat 0.93", "dog 0.80", "cat 0.61"]
    assert all(inside(rect) for _, rect in drawn["labels"])
    assert drawn["labels"][0][1][1] == 0                                     # at the top edge: inside the box
    x, _, w, _ = drawn["labels"][1][1]
    assert x + w == pytest.approx(W) and x < 72                              # pushed left of the right edge
    assert drawn["note"] is None and ax.get_title(loc="left") == ""


@pytest.mark.parametrize("kw, note", [
    (dict(scores=torch.zeros(0), score_thresh=0.5, best_score=0.31), "no detection scored >= 0.50\n(best: 0.31)"),
    (dict(scores=torch.zeros(0), score_thresh=0.5), "no detections"),           # the model found nothing at all
    (dict(), "no objects"),                                                    # ground truth
])
def test_an_empty_panel_says_why_on_the_image(kw, note):
    drawn, ax = panel(title="predictions", **kw)
    assert drawn["note"] == note and [t.get_text() for t in ax.texts] == [note]
    assert ax.get_title(loc="left") == "predictions"                          # the title above, not on the image


def test_skeleton_lines_join_only_visible_keypoints():
    # instance 0: keypoints 0 and 1 labelled, 2 not (v = 0); instance 1: all three labelled
    keypoints = [[[10, 10, 2], [20, 10, 1], [0, 0, 0]], [[40, 40, 2], [50, 40, 2], [45, 50, 2]]]
    drawn, ax = panel(boxes=[[5, 5, 25, 25], [35, 35, 55, 55]], labels=[1, 2], keypoints=keypoints,
                      skeleton=[[0, 1], [1, 2], [2, 0]])
    assert drawn["limbs"] == [(0, 0, 1), (1, 0, 1), (1, 1, 2), (1, 2, 0)]
    assert len(ax.lines) == 4
    assert [len(c.get_offsets()) for c in ax.collections] == [2, 3]          # the points drawn: v > 0 only


def test_masks_are_filled_and_outlined_in_their_instance_colour():
    masks = np.zeros((2, H, W), bool)
    masks[0, 5:20, 5:20] = True
    masks[1, 40:, 60:] = True                                                # touches the image's corner
    drawn, ax = panel(boxes=[[5, 5, 20, 20], [60, 40, 80, 60]], labels=[1, 2], masks=masks)
    overlay = ax.images[1].get_array()                                       # (H, W, RGBA)
    assert tuple(overlay[10, 10, :3]) == pytest.approx(drawn["colours"][0])
    assert tuple(overlay[50, 70, :3]) == pytest.approx(drawn["colours"][1]) and overlay[0, 40, 3] == 0
    assert len(ax.collections) == 2                                          # one outline (contour) per mask


def test_labels_name_the_class_the_score_and_a_note():
    drawn, _ = panel(boxes=[[5, 5, 20, 20], [30, 30, 50, 50]], labels=[1, 2], notes=["(crowd)", ""])
    assert [text for text, _ in drawn["labels"]] == ["cat (crowd)", "dog"]           # ground truth: no scores
    drawn, _ = panel(boxes=[[5, 5, 20, 20]], labels=[2], scores=[0.934])
    assert [text for text, _ in drawn["labels"]] == ["dog 0.93"]
