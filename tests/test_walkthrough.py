"""walkthrough.py and walkthrough.ipynb: each figure draws the model's own numbers (anchors, labels, proposals, RoIs,
RoIAlign points, mask targets, GN/BN statistics), and the notebook runs top to bottom (briefly trained)."""
import os
import time

import matplotlib
import nbclient
import nbformat
import pytest
import torch
import torch.nn.functional as F

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

import walkthrough as wt  # noqa: E402
from boxes import Matcher, box_iou  # noqa: E402
from conftest import ROOT  # noqa: E402
from data import CocoDataset, collate  # noqa: E402
from model import build_model  # noqa: E402
from roi_align import bin_points, map_levels, multilevel_roi_align  # noqa: E402
from shapes import make_shapes  # noqa: E402

INDEX = 3  # the notebook's image: 4 objects of the 3 classes


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """An untrained tiny model, the shapes validation images (the first 6, those of the default set) and gather()'s
    stages of image INDEX."""
    root = make_shapes(str(tmp_path_factory.mktemp("shapes")), num_train=2, num_val=6)
    dataset = CocoDataset(os.path.join(root, "annotations", "instances_val.json"), os.path.join(root, "val"),
                          min_size=128)
    torch.manual_seed(0)
    model = build_model("tiny", num_classes=dataset.num_classes).eval()
    return model, dataset, wt.gather(model, dataset, INDEX)


def _axes(*shape):
    fig, axes = plt.subplots(*shape)
    return fig, axes


def test_gather_keeps_the_image_and_its_ground_truth(run):
    model, dataset, stages = run
    image, target = dataset[INDEX]
    assert stages["image"].shape == (128, 160, 3) and stages["image"].dtype.name == "uint8"
    assert torch.equal(stages["target"]["boxes"], target["boxes"]) and len(target["boxes"]) == 4
    assert stages["strides"] == [4, 8, 16, 32, 64]
    assert set(stages["detections"]) >= {"boxes", "labels", "scores", "masks"}


def test_anchors_drawn_at_one_centre_have_the_sizes_and_ratios_of_their_level(run):
    model, _, stages = run
    fig, ax = _axes()
    drawn = wt.draw_anchors(ax, stages["image"], stages["anchors"], stages["strides"], stages["anchor_sizes"],
                            stages["aspect_ratios"])
    plt.close(fig)
    assert [d["level"] for d in drawn] == ["P2", "P3", "P4", "P5", "P6"]
    for k, (d, size) in enumerate(zip(drawn, (16, 32, 64, 128, 256))):
        cx, cy = d["centre"]
        # the cell anchors of the level (rpn.cell_anchors) moved to the centre
        cell = model.rpn.anchor_generator.cell_anchors[k]
        assert torch.equal(d["boxes"] - torch.tensor([cx, cy, cx, cy]), cell)
        # corners are rounded to whole pixels: P2's 16-pixel anchors are 16.25 and h/w 0.55 instead of 0.5
        assert torch.allclose(d["sizes"], torch.full((3,), float(size)), rtol=0.02)
        assert torch.allclose(d["ratios"], torch.tensor([0.5, 1.0, 2.0]), rtol=0.1)
        # a location of the level's grid: anchors are image size // map size apart (P6: 53 px along x here)
        h, w = stages["features"][k].shape[-2:]
        assert cx % (160 // w) == 0 and cy % (128 // h) == 0


def test_anchor_label_counts_are_the_matchers(run):
    model, _, stages = run
    anchors, gt = torch.cat(stages["anchors"]), stages["target"]["boxes"]
    matched = Matcher(0.7, 0.3, allow_low_quality_matches=True)(box_iou(gt, anchors))
    expected = {"positive": int((matched >= 0).sum()), "ignored": int((matched == Matcher.BETWEEN_THRESHOLDS).sum()),
                "negative": int((matched == Matcher.BELOW_LOW_THRESHOLD).sum())}
    fig, axes = _axes(1, 2)
    counts = wt.draw_anchor_labels(axes[0], stages["image"], stages["anchors"], stages["anchor_labels"], gt)
    sampled = wt.draw_anchor_labels(axes[1], stages["image"], stages["anchors"], stages["anchor_labels"], gt,
                                    sampled=stages["sampled_anchors"])
    plt.close(fig)
    assert counts == expected and expected["positive"] >= len(gt)  # every GT box has its best anchor
    pos, neg = stages["sampled_anchors"]
    assert sampled == {"positive": len(pos), "negative": len(neg), "ignored": 0}
    assert len(pos) + len(neg) == model.rpn.sampler.batch_size_per_image == 128


def test_objectness_maps_are_the_heads_per_location_maximum(run):
    model, _, stages = run
    fig, axes = _axes(1, 5)
    for k, ax in enumerate(axes):
        heat, _ = wt.draw_objectness(ax, stages["objectness"][k], stages["strides"][k], stages["target"]["boxes"],
                                     f"P{k + 2}")
        logits = model.rpn.head([f[None] for f in stages["features"]])[0][k][0]  # (A, h, w)
        assert torch.allclose(heat, torch.sigmoid(logits).max(0).values)
    plt.close(fig)


def test_proposals_after_nms_are_among_the_candidates_before(run):
    model, _, stages = run
    before, after = stages["before_nms"], stages["after_nms"]
    assert len(before) == 250 + 250 + 240 + 60 + 18  # the top 250 of each level, or all of a smaller level
    assert 0 < len(after) <= model.rpn.post_nms_top_n["test"] and len(after) < len(before)
    # the survivors of NMS drawn among the candidates are the model's proposals (the best post_nms_top_n of them)
    survivors = before[stages["nms_survivors"]][:model.rpn.post_nms_top_n["test"]]
    assert len(survivors) == len(after) and torch.allclose(survivors, after)
    fig, axes = _axes(1, 2)
    drawn = wt.draw_proposals(axes[0], stages["image"], before, "before NMS", survivors=stages["nms_survivors"])
    assert torch.equal(drawn["drawn"], before[:25])
    assert drawn["suppressed"] == 25 - int((stages["nms_survivors"] < 25).sum())
    drawn = wt.draw_proposals(axes[1], stages["image"], after, "after NMS", top_k=10)
    plt.close(fig)
    assert torch.equal(drawn["drawn"], after[:10]) and drawn["suppressed"] == 0


def test_sampled_rois_pair_positives_with_their_ground_truth(run):
    model, _, stages = run
    fig, ax = _axes()
    drawn = wt.draw_sampled_rois(ax, stages["image"], stages["rois"], stages["roi_labels"], stages["roi_matched"],
                                 stages["target"]["boxes"], stages["class_names"])
    plt.close(fig)
    assert drawn["positive"] + drawn["negative"] == len(stages["rois"]) <= 64
    assert drawn["positive"] == int((stages["roi_labels"] > 0).sum()) >= 4  # at least the 4 GT boxes themselves
    for roi, gt in drawn["pairs"]:
        assert box_iou(roi[None], gt[None]).item() >= 0.5


def test_roi_align_points_are_bin_points_on_the_rois_level(run):
    _, _, stages = run
    roi = stages["mask_rois"][0]
    points = wt.roi_align_points(roi, stages["features"], stages["strides"])
    assert points["level"] == int(map_levels(roi[None])[0])
    stride = stages["strides"][points["level"] - 2]
    x1, y1, x2, y2 = (roi / stride).tolist()
    fig, axes = _axes(1, 3)
    xy = wt.draw_roi_align(axes, stages["image"], roi, points)
    plt.close(fig)
    xs, ys = bin_points(x1, max(x2 - x1, 1), 7, 2).flatten(), bin_points(y1, max(y2 - y1, 1), 7, 2).flatten()
    assert xy.shape == (14 * 14, 2)
    assert torch.equal(xy, torch.stack(torch.meshgrid(ys, xs, indexing="ij")[::-1], -1).reshape(-1, 2))
    # the 7x7 drawn is what the model's pooling gives this RoI, averaged over channels
    pooled = multilevel_roi_align([f[None] for f in stages["features"][:4]], [roi[None]], stages["image_shape"], 7)
    assert torch.allclose(points["pooled"], pooled[0].mean(0), atol=1e-5)


def test_mask_targets_drawn_are_the_positive_rois_targets(run):
    _, _, stages = run
    fig, axes = _axes(3, 5)
    drawn = wt.draw_mask_targets(axes, stages["image"], stages["mask_rois"], stages["mask_target"],
                                 stages["mask_pred"], stages["mask_labels"], stages["class_names"])
    plt.close(fig)
    assert drawn["targets"].shape == drawn["preds"].shape == (5, 28, 28)
    assert torch.equal(drawn["targets"], stages["mask_target"][:5])
    assert stages["mask_target"].min() >= 0 and stages["mask_target"].max() <= 1
    assert len(stages["mask_rois"]) == int((stages["roi_labels"] > 0).sum())


def test_group_norm_statistics_are_torchs_and_do_not_depend_on_the_batch(run):
    model, dataset, _ = run
    stats = wt.norm_statistics(model, dataset)
    batch, single = stats["batch"], stats["single"]
    images, _, _ = collate([dataset[i] for i in (1, 2, 3, 4)])
    x = model.backbone.conv1(images).detach()  # (4, 16, 64, 80)
    N, C, H, W = x.shape
    G = model.backbone.bn1.num_groups
    # torch's own GroupNorm kernel returns the mean and 1 / sqrt(var + eps) of every (image, group)
    _, mean, rstd = torch.native_group_norm(x, None, None, N, C, H * W, G, 1e-5)
    assert torch.allclose(batch["gn_mean"], mean, atol=1e-5)
    assert torch.allclose(batch["gn_var"], rstd ** -2 - 1e-5, rtol=1e-4, atol=1e-6)
    # normalizing by hand with these statistics is F.group_norm
    by_hand = (x.unflatten(1, (G, -1)) - batch["gn_mean"][:, :, None, None, None]) / torch.sqrt(
        batch["gn_var"][:, :, None, None, None] + 1e-5)  # (N, G, C/G, H, W)
    assert torch.allclose(by_hand.flatten(1, 2), F.group_norm(x, G), atol=1e-5)
    # BN's are the batch's per-channel statistics (momentum 1: the running buffers become them; var unbiased there)
    running_mean, running_var = torch.zeros(C), torch.ones(C)
    F.batch_norm(x, running_mean, running_var, training=True, momentum=1.0)
    assert torch.allclose(batch["bn_mean"], running_mean, atol=1e-5)
    n = N * H * W
    assert torch.allclose(batch["bn_var"], running_var * (n - 1) / n, rtol=1e-4)
    # image 0 alone: GN's statistics are the same, BN's are not
    assert torch.allclose(single["gn_mean"][0], batch["gn_mean"][0], atol=1e-6)
    assert torch.allclose(single["gn_var"][0], batch["gn_var"][0], rtol=1e-5)
    assert (single["bn_mean"] - batch["bn_mean"]).abs().max() > 1e-2
    fig, axes = _axes(1, 3)
    panels = wt.draw_norm_statistics(axes, stats)
    plt.close(fig)
    assert torch.equal(panels[0]["single"], single["gn_mean"][0]) and torch.equal(panels[1]["batch"], batch["bn_mean"])


def test_overview_png_is_written(run, tmp_path):
    _, _, stages = run
    out = wt.draw_overview(stages, str(tmp_path / "overview.png"))
    assert os.path.getsize(out) < 300_000


def test_the_notebook_runs_top_to_bottom_and_draws_every_figure(tmp_path):
    """The notebook, executed as Jupyter would (nbclient, the python3 kernel of this environment), with a short
    training run into tmp_path instead of the demo's checkpoint: no cell fails, every figure cell shows a figure."""
    notebook = nbformat.read(os.path.join(ROOT, "walkthrough.ipynb"), as_version=4)
    parameters = [cell for cell in notebook.cells if "parameters" in cell.metadata.get("tags", [])]
    assert len(parameters) == 1
    parameters[0].source = (f"ITERS = 20\nRUN_DIR = {str(tmp_path / 'run')!r}\nDEMO_CHECKPOINT = None\n"
                            f"INDEX = {INDEX}\n")
    start = time.perf_counter()
    # the kernel's working directory is the repository root: imports and data_cache/ as from a fresh clone
    nbclient.NotebookClient(notebook, timeout=600, kernel_name="python3",
                            resources={"metadata": {"path": ROOT}}).execute()
    seconds = time.perf_counter() - start
    outputs = [out for cell in notebook.cells if cell.cell_type == "code" for out in cell.outputs]
    assert not [out for out in outputs if out.output_type == "error"]
    figure_cells = [cell for cell in notebook.cells if cell.cell_type == "code" and "plt.show()" in cell.source]
    assert len(figure_cells) == 10
    for cell in figure_cells:
        assert any("image/png" in out.get("data", {}) for out in cell.outputs), cell.source
    assert os.path.isfile(os.path.join(tmp_path, "run", "model_0000020.pth"))
    print(f"notebook ran in {seconds:.0f} s")
