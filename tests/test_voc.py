"""PASCAL VOC (Sec. 5.2): the VOCdevkit reader on a generated tiny devkit, VOC AP on hand-worked examples, and a
short Faster R-CNN training run on VOC data. CI has no VOC data: every test builds what it reads in tmp_path."""
import json
import math
from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image

import evaluate
import train
from data import VOC_CLASSES, DataError, VOCDataset, build_dataset, read_voc_annotation
from model import build_model
from voc import voc_ap, voc_eval, voc_metrics

W, H = 64, 48  # every generated image

# name -> [(class, xmin, ymin, xmax, ymax in VOC's 1-based inclusive pixels, difficult)]
IMAGES = {
    "2007": {"000001": [("dog", 1, 1, W, H, 0), ("person", 11, 21, 30, 40, 1)],
             "000002": [("car", 5, 5, 36, 28, 0)],
             "000003": [("cat", 20, 10, 50, 40, 0)]},
    "2012": {"2008_000001": [("aeroplane", 3, 4, 40, 30, 0), ("tvmonitor", 30, 10, 60, 45, 0)],
             "2008_000002": [("bird", 10, 10, 30, 30, 1)],
             "2008_000003": [("dog", 8, 6, 50, 44, 0), ("person", 40, 2, 60, 40, 0)],
             "2008_000004": [("cat", 1, 1, 32, 24, 0), ("cat", 33, 25, W, H, 1)]},
}
IMAGE_SETS = {"2007": {"trainval": ["000001", "000002"], "test": ["000003"]},
              "2012": {"train": ["2008_000001", "2008_000002"], "val": ["2008_000003", "2008_000004"]}}


def write_xml(path, objects, width=W, height=H):
    parts = [f"<annotation><filename>{path.stem}.jpg</filename>",
             f"<size><width>{width}</width><height>{height}</height><depth>3</depth></size>"]
    for name, x1, y1, x2, y2, difficult in objects:
        parts.append(f"<object><name>{name}</name><pose>Unspecified</pose><truncated>0</truncated>"
                     f"<difficult>{difficult}</difficult><bndbox><xmin>{x1}</xmin><ymin>{y1}</ymin>"
                     f"<xmax>{x2}</xmax><ymax>{y2}</ymax></bndbox></object>")
    path.write_text("".join(parts) + "</annotation>")


@pytest.fixture
def devkit(tmp_path):
    """A tiny VOCdevkit: VOC2007 and VOC2012 with JPEGs, XMLs (some objects difficult) and ImageSets/Main lists."""
    rng = np.random.default_rng(0)
    root = tmp_path / "VOCdevkit"
    for year, images in IMAGES.items():
        for sub in ("Annotations", "JPEGImages", "ImageSets/Main"):
            (root / f"VOC{year}" / sub).mkdir(parents=True)
        for name, objects in images.items():
            pixels = rng.integers(0, 255, (H, W, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(root / f"VOC{year}" / "JPEGImages" / f"{name}.jpg")
            write_xml(root / f"VOC{year}" / "Annotations" / f"{name}.xml", objects)
        for image_set, names in IMAGE_SETS[year].items():
            (root / f"VOC{year}" / "ImageSets" / "Main" / f"{image_set}.txt").write_text("\n".join(names) + "\n")
    return root


def test_reader_classes_boxes_and_difficult(devkit):
    width, height, objects = read_voc_annotation(devkit / "VOC2007" / "Annotations" / "000001.xml")
    assert (width, height) == (W, H)
    # 1-based inclusive -> continuous: (1, 1, W, H) covers the whole image, [0, 0, W, H] (Detectron2's rule).
    assert objects == [("dog", [0.0, 0.0, W, H], 0), ("person", [10.0, 20.0, 30.0, 40.0], 1)]

    dataset = VOCDataset(str(devkit), (("2007", "trainval"),), min_size=H, max_size=1333)
    assert dataset.class_names == list(VOC_CLASSES) and dataset.num_classes == 21
    assert dataset.class_names[:3] == ["aeroplane", "bicycle", "bird"] and dataset.class_names[-1] == "tvmonitor"
    dog, person = VOC_CLASSES.index("dog") + 1, VOC_CLASSES.index("person") + 1  # category ids 12, 15
    anns = dataset.coco.loadAnns(dataset.coco.getAnnIds(imgIds=1))
    assert [(a["category_id"], a["bbox"], a["difficult"], a["iscrowd"]) for a in anns] == [
        (dog, [0.0, 0.0, W, H], 0, 0), (person, [10, 20, 20, 20], 1, 0)]
    assert [a["area"] for a in anns] == [W * H, 20 * 20]  # COCOeval's small / medium / large ranges read it
    # The training target leaves the difficult person out and has no masks; the ground truth keeps it.
    image, target = dataset[0]
    assert image.shape == (3, H, W) and "masks" not in target
    assert target["boxes"].tolist() == [[0.0, 0.0, W, H]] and target["labels"].tolist() == [dog]
    # A flipped training image flips the boxes too (without masks to flip).
    flipped = VOCDataset(str(devkit), (("2012", "val"),), train=True, min_size=H, flip_prob=1.0)
    _, target = flipped[0]  # 2008_000003: dog [7, 5, 50, 44], person [39, 1, 60, 40]
    assert target["boxes"].tolist() == [[W - 50, 5, W - 7, 44], [W - 60, 1, W - 39, 40]]


def test_paper_split_composition(devkit):
    train_set = build_dataset(str(devkit), "train", train=True, min_size=H)
    val_set = build_dataset(str(devkit), "val", train=False, min_size=H)
    assert isinstance(train_set, VOCDataset) and not train_set.has_masks
    # Sec. 5.2: train = VOC2007 trainval + VOC2012 train, val = VOC2012 val; image ids unique across the years.
    names = [train_set.coco.imgs[i]["file_name"] for i in train_set.image_ids]
    assert names == ["VOC2007/JPEGImages/000001.jpg", "VOC2007/JPEGImages/000002.jpg",
                     "VOC2012/JPEGImages/2008_000001.jpg", "VOC2012/JPEGImages/2008_000002.jpg"]
    assert train_set.image_ids == [1, 2, 3, 4]
    assert [val_set.coco.imgs[i]["file_name"] for i in val_set.image_ids] == [
        "VOC2012/JPEGImages/2008_000003.jpg", "VOC2012/JPEGImages/2008_000004.jpg"]
    # An image whose only object is difficult stays as a negative (no targets); its GT keeps the bird.
    _, target = train_set[3]
    assert len(target["boxes"]) == 0 and len(train_set.coco.getAnnIds(imgIds=4)) == 1


def test_reader_errors_name_the_culprit(devkit, tmp_path):
    only_2007 = tmp_path / "only2007"
    (only_2007 / "VOC2007" / "ImageSets" / "Main").mkdir(parents=True)
    (only_2007 / "VOC2007" / "ImageSets" / "Main" / "trainval.txt").write_text("000001\n")
    with pytest.raises(DataError, match=r"only2007/VOC2012/ImageSets/Main/train\.txt") as e:
        build_dataset(str(only_2007), "train", train=True)
    assert "\n" not in str(e.value)
    with pytest.raises(DataError, match=r"only2007/VOC2007/Annotations/000001\.xml"):
        VOCDataset(str(only_2007), (("2007", "trainval"),))
    xml = devkit / "VOC2007" / "Annotations" / "000002.xml"
    write_xml(xml, [("unicorn", 1, 1, 5, 5, 0)])
    with pytest.raises(DataError) as e:
        read_voc_annotation(xml)
    assert str(e.value) == f"{xml}: unknown class 'unicorn' (not one of the 20 VOC classes)"  # not re-wrapped
    for value in ("nan", "inf", "-inf"):  # float() reads them; the loss would turn non-finite, naming no file
        write_xml(xml, [("dog", 1, 1, value, 5, 0)])
        with pytest.raises(DataError, match=rf"000002\.xml: dog bndbox \[1.0, 1.0, {value}, 5.0\] is not finite"):
            read_voc_annotation(xml)
    xml.write_text("<annotation><size><width>64</width>")
    with pytest.raises(DataError, match=r"unreadable annotation file .*000002\.xml"):
        read_voc_annotation(xml)
    xml.write_text("<annotation><size><width>64</width></size></annotation>")
    with pytest.raises(DataError, match=r"000002\.xml: missing or malformed size"):
        read_voc_annotation(xml)
    with pytest.raises(DataError, match="VOC split must be one of train, val"):
        VOCDataset.paper_split(str(devkit), "test")


def test_voc_ap_area_and_11_point():
    # 2 objects; detections in score order: TP, FP, TP -> recall (.5, .5, 1), precision (1, .5, 2/3).
    recall, precision = [0.5, 0.5, 1.0], [1.0, 0.5, 2 / 3]
    # Area: interpolated precision 1 up to recall .5, then 2/3 up to 1 -> .5 * 1 + .5 * 2/3.
    assert voc_ap(recall, precision) == pytest.approx(0.5 + 0.5 * 2 / 3)
    # 11-point: t = 0 .. .5 (6 points) read 1, t = .6 .. 1 (5 points) read 2/3.
    assert voc_ap(recall, precision, use_07_metric=True) == pytest.approx((6 + 5 * 2 / 3) / 11)
    # Half the objects found, never a false positive: area .5, 11-point 6/11 (t = 0 .. .5).
    assert voc_ap([0.5], [1.0]) == pytest.approx(0.5)
    assert voc_ap([0.5], [1.0], use_07_metric=True) == pytest.approx(6 / 11)
    # Recall exactly 3 of 10 objects: Detectron's thresholds are np.arange(0, 1.1, 0.1), whose 4th is
    # 0.30000000000000004 > 0.3, so 3 points count (0, .1, .2); 4 of 10 reaches t = .4 = 4 * 0.1 (5 points).
    assert voc_ap([0.1, 0.2, 3 / 10], [1.0, 1.0, 1.0], use_07_metric=True) == pytest.approx(3 / 11)
    assert voc_ap([0.1, 0.2, 0.3, 4 / 10], [1.0] * 4, use_07_metric=True) == pytest.approx(5 / 11)
    assert voc_ap([0.1, 0.2, 0.3], [1.0, 1.0, 1.0]) == pytest.approx(0.3)
    # All found at precision 1: both are 1. Nothing detected: both are 0.
    assert voc_ap([0.5, 1.0], [1.0, 1.0]) == voc_ap([0.5, 1.0], [1.0, 1.0], use_07_metric=True) == pytest.approx(1)
    assert voc_ap([], []) == voc_ap([], [], use_07_metric=True) == 0.0


def gt(image_id, category_id, box, difficult=0):
    x1, y1, x2, y2 = box
    return {"image_id": image_id, "category_id": category_id, "bbox": [x1, y1, x2 - x1, y2 - y1],
            "difficult": difficult}


def det(image_id, category_id, box, score):
    x1, y1, x2, y2 = box
    return {"image_id": image_id, "category_id": category_id, "bbox": [x1, y1, x2 - x1, y2 - y1], "score": score}


CATS = [{"id": 1, "name": "a"}, {"id": 2, "name": "b"}, {"id": 3, "name": "c"}]
A, B = (0, 0, 10, 10), (20, 20, 30, 30)


def test_voc_eval_difficult_is_ignored():
    annotations = [gt(1, 1, A), gt(1, 1, B, difficult=1)]
    # A detection of the difficult object (even the top-scoring one) is not a false positive, and missing it is
    # not a miss: AP 1. Without the flag, the same detections give recall 1/2 only.
    for dets in ([det(1, 1, B, 0.9), det(1, 1, A, 0.8)], [det(1, 1, A, 0.8)]):
        aps, mean = voc_eval(annotations, dets, CATS[:1])
        assert aps == {"a": 1.0} and mean == 1.0
    assert voc_eval([gt(1, 1, A), gt(1, 1, B)], [det(1, 1, A, 0.8)], CATS[:1])[1] == pytest.approx(0.5)


def test_voc_eval_duplicates_and_low_iou_are_false_positives():
    annotations = [gt(1, 1, A), gt(1, 1, B)]
    # TP on A, a duplicate of A (FP), TP on B: recall (.5, .5, 1), precision (1, .5, 2/3), as in test_voc_ap.
    dets = [det(1, 1, A, 0.9), det(1, 1, (0, 0, 10, 9), 0.8), det(1, 1, B, 0.7)]
    assert voc_eval(annotations, dets, CATS[:1])[1] == pytest.approx(0.5 + 0.5 * 2 / 3)
    assert voc_eval(annotations, dets, CATS[:1], use_07_metric=True)[1] == pytest.approx((6 + 5 * 2 / 3) / 11)
    # IoU 0.4 with A: a FP, ahead of an exact TP -> precision (0, .5) at recall (0, .5): AP .5 * .5.
    low = [det(1, 1, (0, 0, 10, 4), 0.9), det(1, 1, A, 0.5)]
    assert voc_eval(annotations, low, CATS[:1])[1] == pytest.approx(0.25)
    # IoU exactly 0.5 passes (VOC devkit: ovmax >= minoverlap).
    assert voc_eval(annotations, [det(1, 1, (0, 0, 10, 5), 0.9)], CATS[:1])[1] == pytest.approx(0.5)
    # A detection in an image without any ground truth is a FP.
    assert voc_eval(annotations, [det(2, 1, A, 0.9), det(1, 1, A, 0.5)], CATS[:1])[1] == pytest.approx(0.25)


def test_voc_eval_duplicate_does_not_fall_back_to_the_next_box():
    # VOC devkit: a detection is compared only with its most overlapping box. Here the second detection overlaps A
    # (IoU .905, already taken) and B = A shifted by 2 (IoU .739): it is a FP, and B stays missed (AP .5).
    annotations = [gt(1, 1, A), gt(1, 1, (2, 0, 12, 10))]
    dets = [det(1, 1, A, 0.9), det(1, 1, (0.5, 0, 10.5, 10), 0.8)]
    assert voc_eval(annotations, dets, CATS[:1])[1] == pytest.approx(0.5)


def test_voc_eval_several_classes():
    annotations = [gt(1, 1, A), gt(1, 2, B), gt(2, 2, A)]
    dets = [det(1, 1, A, 0.9),                       # class a: found, AP 1
            det(1, 2, A, 0.95),                      # class b on the class-a box: a FP (boxes match per class)
            det(1, 2, B, 0.6), det(2, 2, A, 0.5)]    # class b: FP, TP, TP -> precision (0, .5, 2/3) at recall
    aps, mean = voc_eval(annotations, dets, CATS)   # (0, .5, 1): AP .5 * 2/3 + .5 * 2/3
    assert aps["a"] == 1.0 and aps["b"] == pytest.approx(2 / 3)
    assert math.isnan(aps["c"])  # no ground truth: undefined, left out of the mean
    assert mean == pytest.approx((1 + 2 / 3) / 2)


def test_faster_rcnn_presets():
    model = build_model("tiny", num_classes=21, mask_head=False)
    assert model.roi_heads.mask_head is None and not any("mask" in name for name, _ in model.named_parameters())
    assert build_model("tiny", num_classes=21).roi_heads.mask_head is not None  # the default keeps Mask R-CNN
    faster = build_model("r101_fpn_gn_faster", num_classes=21)
    assert faster.roi_heads.mask_head is None and len(faster.backbone.layer3) == 23  # ResNet-101, GN, no masks
    assert type(faster.roi_heads.box_head.convs[0][1]).__name__ == "GroupNorm"


def test_training_on_voc_writes_voc_map(devkit, tmp_path):
    out = tmp_path / "run"
    train.main(["--data", str(devkit), "--preset", "tiny", "--device", "cpu", "--batch-size", "2", "--min-size",
                str(H), "--max-iters", "2", "--warmup-iters", "1", "--workers", "0", "--log-period", "1",
                "--output-dir", str(out)])
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    losses, evals = [r for r in rows if "loss" in r], [r for r in rows if "bbox/AP" in r]
    assert len(losses) == 2 and "loss_mask" not in losses[0] and "loss_box" in losses[0]  # Faster R-CNN
    assert len(evals) == 1 and "segm/AP" not in evals[0]
    assert 0.0 <= evals[0]["voc/mAP50"] <= 1.0 and 0.0 <= evals[0]["voc/mAP50_11pt"] <= 1.0
    # The val split (2008_000003, 2008_000004) has dogs, people and cats: one per-class AP each.
    assert sorted(k for k in evals[0] if k.startswith("voc/AP50/")) == ["voc/AP50/cat", "voc/AP50/dog",
                                                                        "voc/AP50/person"]
    # evaluate.py (and plot.py) rebuild the same box-only model from the checkpoint, with the VOC val split.
    model, val_set = evaluate.load_run(str(out / "model_0000002.pth"))
    assert model.roi_heads.mask_head is None and isinstance(val_set, VOCDataset) and len(val_set) == 2


def test_a_missing_difficult_tag_means_not_difficult(tmp_path):
    # Some VOC XMLs have no <difficult> (py-faster-rcnn reads them as 0): the object is trained on and evaluated.
    path = tmp_path / "a.xml"
    path.write_text(f"<annotation><size><width>{W}</width><height>{H}</height></size><object><name>dog</name>"
                    f"<bndbox><xmin>1</xmin><ymin>2</ymin><xmax>30</xmax><ymax>40</ymax></bndbox></object>"
                    f"</annotation>")
    assert read_voc_annotation(path)[2] == [("dog", [0.0, 1.0, 30.0, 40.0], 0)]


def test_voc_metrics_names_the_area_and_11_point_numbers():
    # test_voc_ap_area_and_11_point's case: 2 objects, detections TP, FP, TP in score order.
    annotations = [gt(1, 1, A), gt(1, 1, B)]
    dataset = SimpleNamespace(image_ids=[1], coco=SimpleNamespace(dataset={"annotations": annotations,
                                                                            "categories": CATS[:1]}))
    results = [det(1, 1, A, 0.9), det(1, 1, (40, 40, 50, 50), 0.8), det(1, 1, B, 0.7)]
    metrics = voc_metrics(dataset, results)
    assert metrics["voc/mAP50"] == pytest.approx(0.5 + 0.5 * 2 / 3)  # VOC2010+ area
    assert metrics["voc/mAP50_11pt"] == pytest.approx((6 + 5 * 2 / 3) / 11)  # VOC2007
    assert metrics["voc/AP50/a"] == metrics["voc/mAP50"]
