"""Tests for data.py: COCO-json parsing, resize/flip, scale jitter, collate, samplers, shapes, PennFudan, bad input."""
import itertools
import json
import os

import numpy as np
import pycocotools.mask as mask_utils
import pytest
import torch
from PIL import Image
from pycocotools.coco import COCO

from conftest import SHARED_DATA
from data import (IMAGE_MEAN, IMAGE_STD, CocoDataset, DataError, PennFudanDataset, TrainSampler, build_dataset,
                  collate, make_eval_loader, make_train_loader, resized_size)
from shapes import make_shapes

PENNFUDAN = os.path.join(SHARED_DATA, "PennFudanPed")
COCO_SUBSET = os.path.join(SHARED_DATA, "coco_subset")


def mask_box(mask):
    """Tight xyxy box of a (h, w) mask, pixel-edge convention (x2 = last column + 1)."""
    ys, xs = torch.nonzero(mask, as_tuple=True)
    return torch.tensor([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1], dtype=torch.float32)


def uncompressed_rle(mask):
    """COCO uncompressed RLE written out by hand: run lengths in column-major order, starting with a run of 0s."""
    flat = mask.flatten(order="F").tolist()
    runs = [len(list(group)) for _, group in itertools.groupby(flat)]
    return {"size": list(mask.shape), "counts": ([0] if flat[0] == 1 else []) + runs}


def write_image(path, h, w):
    pixels = (np.arange(h * w * 3).reshape(h, w, 3) % 251).astype(np.uint8)
    Image.fromarray(pixels).save(path)
    return pixels


def write_json(path, images, annotations, categories=({"id": 2, "name": "a"}, {"id": 5, "name": "b"})):
    with open(path, "w") as f:
        json.dump({"images": images, "annotations": annotations, "categories": list(categories)}, f)
    return str(path)


@pytest.fixture
def tiny(tmp_path):
    """Three images, all with shorter side 40 (so min_size=40 means scale 1). Image 1: a polygon (label b = 2),
    an L-shaped compressed RLE (label a = 1), a crowd region, a zero-width box. Image 2: no annotations.
    Image 3: an uncompressed RLE and a negative-height box."""
    (tmp_path / "img").mkdir()
    pixels = write_image(tmp_path / "img" / "1.png", 40, 60)
    write_image(tmp_path / "img" / "2.png", 40, 50)
    write_image(tmp_path / "img" / "3.png", 40, 64)
    rect = np.zeros((40, 60), np.uint8)
    rect[10:20, 10:30] = 1  # polygon (10,10)-(30,20) covers rows 10..19, columns 10..29
    ell = np.zeros((40, 60), np.uint8)
    ell[25:35, 40:45] = 1
    ell[30:35, 45:55] = 1
    crowd = np.zeros((40, 60), np.uint8)
    crowd[0:5, 0:10] = 1
    blob = np.zeros((40, 64), np.uint8)
    blob[5:15, 50:60] = 1
    blob[12:20, 52:56] = 1

    def rle(m):
        r = mask_utils.encode(np.asfortranarray(m))
        return {"size": r["size"], "counts": r["counts"].decode("ascii")}

    images = [{"id": i, "file_name": f"{i}.png", "height": 40, "width": w} for i, w in ((1, 60), (2, 50), (3, 64))]
    anns = [{"id": 1, "image_id": 1, "category_id": 5, "bbox": [10, 10, 20, 10], "area": 200, "iscrowd": 0,
             "segmentation": [[10, 10, 30, 10, 30, 20, 10, 20]]},
            {"id": 2, "image_id": 1, "category_id": 2, "bbox": [40, 25, 15, 10], "area": 75, "iscrowd": 0,
             "segmentation": rle(ell)},
            {"id": 3, "image_id": 1, "category_id": 2, "bbox": [0, 0, 10, 5], "area": 50, "iscrowd": 1,
             "segmentation": rle(crowd)},
            {"id": 4, "image_id": 1, "category_id": 2, "bbox": [5, 5, 0, 3], "area": 0, "iscrowd": 0,
             "segmentation": [[5, 5, 5, 5, 5, 8, 5, 8]]},
            {"id": 5, "image_id": 3, "category_id": 5, "bbox": [50, 5, 10, 15], "area": 132, "iscrowd": 0,
             "segmentation": uncompressed_rle(blob)},
            {"id": 6, "image_id": 3, "category_id": 5, "bbox": [1, 1, 4, -2], "area": 0, "iscrowd": 0,
             "segmentation": [[1, 1, 5, 1, 5, 2]]}]
    ann_file = write_json(tmp_path / "tiny.json", images, anns)
    return {"ann": ann_file, "dir": str(tmp_path / "img"), "pixels": pixels, "rect": rect, "ell": ell, "blob": blob}


def test_tiny_coco_masks_labels_crowd_and_dropped(tiny, capsys):
    ds = CocoDataset(tiny["ann"], tiny["dir"], min_size=40)
    out = capsys.readouterr().out
    assert f"dropped 2 annotations with no area inside their image in {tiny['ann']}: ids 4, 6" in out
    assert ds.cat_ids == [2, 5] and ds.class_names == ["a", "b"] and ds.num_classes == 3 and ds.image_ids == [1, 2, 3]
    image, target = ds[0]
    assert target["image_id"] == 1 and target["orig_size"] == (40, 60) and target["size"] == (40, 60)
    torch.testing.assert_close(target["boxes"], torch.tensor([[10.0, 10, 30, 20], [40, 25, 55, 35]]))
    assert target["labels"].tolist() == [2, 1]  # category 5 -> label 2, category 2 -> label 1; crowd excluded
    assert target["masks"].dtype == torch.uint8
    assert torch.equal(target["masks"][0], torch.from_numpy(tiny["rect"]))  # polygon -> pixels
    assert torch.equal(target["masks"][1], torch.from_numpy(tiny["ell"]))  # compressed RLE -> pixels
    assert ds.coco.anns[3]["iscrowd"] == 1 and len(ds.coco.anns) == 6  # COCOeval still sees crowd (and all) anns
    rgb = image * torch.tensor(IMAGE_STD)[:, None, None] + torch.tensor(IMAGE_MEAN)[:, None, None]
    torch.testing.assert_close(rgb, torch.from_numpy(tiny["pixels"]).permute(2, 0, 1) / 255, atol=1e-5, rtol=0)
    _, target = ds[2]  # uncompressed RLE
    assert torch.equal(target["masks"][0], torch.from_numpy(tiny["blob"])) and target["labels"].tolist() == [2]


def test_pixels_are_normalized_as_torchvision_does():
    # RGB in [0, 1] with the ImageNet statistics of torchvision's detection models, which --init imagenet's
    # torchvision weights were trained with (not Detectron's BGR 0..255)
    from torchvision.models.detection import fasterrcnn_resnet50_fpn
    transform = fasterrcnn_resnet50_fpn(weights=None, weights_backbone=None).transform
    assert list(IMAGE_MEAN) == transform.image_mean and list(IMAGE_STD) == transform.image_std


@pytest.mark.parametrize("train", [False, True])
def test_empty_image_is_kept(tiny, train):
    ds = CocoDataset(tiny["ann"], tiny["dir"], train=train, min_size=20, flip_prob=1.0)
    image, target = ds[1]
    assert image.shape == (3, 20, 25)
    assert target["boxes"].shape == (0, 4) and target["labels"].shape == (0,) and target["masks"].shape == (0, 20, 25)


def test_resize_rule_and_scaled_boxes(tmp_path):
    assert resized_size(480, 640, 800, 1333) == (800, 1067)  # 640 * 800/480 = 1066.7
    assert resized_size(200, 800, 800, 1333) == (333, 1333)  # 800 * 4 > 1333: long side capped, 200 * 1333/800
    write_image(tmp_path / "big.png", 480, 640)
    ann = {"id": 1, "image_id": 1, "category_id": 2, "bbox": [64, 48, 320, 240], "area": 1, "iscrowd": 0,
           "segmentation": [[64, 48, 384, 48, 384, 288, 64, 288]]}
    ds = CocoDataset(write_json(tmp_path / "a.json", [{"id": 1, "file_name": "big.png", "height": 480,
                                                        "width": 640}], [ann]), str(tmp_path))
    image, target = ds[0]
    assert image.shape == (3, 800, 1067) and target["masks"].shape == (1, 800, 1067) and target["size"] == (800, 1067)
    sx, sy = 1067 / 640, 800 / 480
    torch.testing.assert_close(target["boxes"], torch.tensor([[64 * sx, 48 * sy, 384 * sx, 288 * sy]]))
    torch.testing.assert_close(mask_box(target["masks"][0]), target["boxes"][0], atol=1.0, rtol=0)


def test_flip_boxes_agree_with_masks(tiny):
    plain = CocoDataset(tiny["ann"], tiny["dir"], min_size=40)
    flipped = CocoDataset(tiny["ann"], tiny["dir"], train=True, min_size=40, flip_prob=1.0)
    image, target = plain[0]
    image_f, target_f = flipped[0]
    torch.testing.assert_close(target_f["boxes"], torch.tensor([[30.0, 10, 50, 20], [5, 25, 20, 35]]))  # 60 - x
    for mask, box in zip(target_f["masks"], target_f["boxes"]):
        assert torch.equal(mask_box(mask), box)
    assert torch.equal(image_f, image.flip(-1)) and torch.equal(target_f["masks"], target["masks"].flip(-1))
    never = CocoDataset(tiny["ann"], tiny["dir"], train=True, min_size=40, flip_prob=0.0)
    assert torch.equal(never[0][1]["boxes"], target["boxes"])


def test_scale_jitter_range_and_determinism(tiny):
    ds = CocoDataset(tiny["ann"], tiny["dir"], train=True, min_size=(20, 36), max_size=1000)
    shorts = {min(ds[(0, seed)][0].shape[-2:]) for seed in range(40)}
    assert shorts <= set(range(20, 37)) and len(shorts) > 5
    both_ends = CocoDataset(tiny["ann"], tiny["dir"], train=True, min_size=(20, 21), max_size=1000)
    assert {min(both_ends[(0, seed)][0].shape[-2:]) for seed in range(40)} == {20, 21}  # [lo, hi] inclusive
    a, b = ds[(0, 7)], ds[(0, 7)]
    assert torch.equal(a[0], b[0]) and torch.equal(a[1]["boxes"], b[1]["boxes"])
    c = ds[2]  # a plain int in training means aug_seed = index
    d = ds[(2, 2)]
    assert torch.equal(c[0], d[0]) and torch.equal(c[1]["masks"], d[1]["masks"])
    test_time = CocoDataset(tiny["ann"], tiny["dir"], train=False, min_size=(20, 36))
    assert {test_time[i][0].shape[-2] for i in range(3)} == {36}  # no jitter at test time: the largest scale


def test_collate_pads_to_multiple_of_32():
    a, b = torch.randn(3, 50, 70), torch.randn(3, 65, 40)
    images, sizes, targets = collate([(a, {"k": 0}), (b, {"k": 1})])
    assert images.shape == (2, 3, 96, 96) and sizes == [(50, 70), (65, 40)] and [t["k"] for t in targets] == [0, 1]
    assert all(type(v) is int for size in sizes for v in size)
    assert torch.equal(images[0, :, :50, :70], a) and torch.equal(images[1, :, :65, :40], b)
    assert images[0, :, 50:].abs().sum() == 0 and images[0, :, :, 70:].abs().sum() == 0
    assert images[1, :, 65:].abs().sum() == 0 and images[1, :, :, 40:].abs().sum() == 0
    assert collate([(torch.ones(3, 64, 32), {})])[0].shape == (1, 3, 64, 32)  # already a multiple: no padding


def take(sampler, n):
    return list(itertools.islice(iter(sampler), n))


def test_train_sampler_determinism_epochs_and_seeds():
    assert take(TrainSampler(10, seed=3), 50) == take(TrainSampler(10, seed=3), 50)
    assert take(TrainSampler(10, seed=3), 10) != take(TrainSampler(10, seed=4), 10)
    stream = take(TrainSampler(10, seed=3), 30)
    epochs = [[index for index, _ in stream[e * 10:(e + 1) * 10]] for e in range(3)]
    assert all(sorted(epoch) == list(range(10)) for epoch in epochs) and epochs[0] != epochs[1]
    assert len({aug_seed for _, aug_seed in stream}) == 30  # every position gets its own augmentation


@pytest.mark.parametrize("size", [10, 7])
def test_train_sampler_sharding(size):
    world = take(TrainSampler(size, seed=1), 3 * size)
    r0 = take(TrainSampler(size, seed=1, rank=0, world_size=2), 3 * size)
    r1 = take(TrainSampler(size, seed=1, rank=1, world_size=2), 3 * size)
    assert r0[: (3 * size + 1) // 2] == world[0::2] and r1[: 3 * size // 2] == world[1::2]
    first_epoch = [i for i, _ in r0[: (size + 1) // 2]] + [i for i, _ in r1[: size // 2]]
    assert sorted(first_epoch) == list(range(size))  # disjoint, and together they cover epoch 0


def test_train_sampler_start_skips_items():
    full = take(TrainSampler(10, seed=2, rank=1, world_size=2), 33)
    assert take(TrainSampler(10, seed=2, start=13, rank=1, world_size=2), 20) == full[13:]


def test_train_loader_resume_and_workers(tiny):
    ds = CocoDataset(tiny["ann"], tiny["dir"], train=True, min_size=(20, 36), max_size=100)
    batches = list(itertools.islice(make_train_loader(ds, batch_size=2, seed=5, workers=0), 3))
    resumed = next(make_train_loader(ds, batch_size=2, seed=5, start_iter=1, workers=0))
    parallel = list(itertools.islice(make_train_loader(ds, batch_size=2, seed=5, workers=2), 3))
    for a, b in [(batches[1], resumed)] + list(zip(batches, parallel)):
        assert torch.equal(a[0], b[0]) and a[1] == b[1]
        assert all(torch.equal(x["boxes"], y["boxes"]) for x, y in zip(a[2], b[2]))


def test_eval_loader_sharding(tiny):
    ds = CocoDataset(tiny["ann"], tiny["dir"], min_size=20)
    ids = [[t["image_id"] for _, _, targets in make_eval_loader(ds, workers=0, rank=r, world_size=2) for t in targets]
           for r in range(2)]
    assert ids == [[1, 3], [2]]


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    return make_shapes(str(tmp_path_factory.mktemp("shapes")), num_train=30, num_val=6)


def test_shapes_deterministic_and_idempotent(shapes, tmp_path):
    other = make_shapes(str(tmp_path / "again"), num_train=30, num_val=6)
    for name in ("instances_train.json", "instances_val.json"):
        with open(os.path.join(shapes, "annotations", name)) as f, open(os.path.join(other, "annotations", name)) as g:
            assert f.read() == g.read()
    for split in ("train", "val"):
        files = sorted(os.listdir(os.path.join(shapes, split)))
        assert files == sorted(os.listdir(os.path.join(other, split))) and len(files) == {"train": 30, "val": 6}[split]
        for name in files:
            assert np.array_equal(np.array(Image.open(os.path.join(shapes, split, name))),
                                  np.array(Image.open(os.path.join(other, split, name))))
    png = os.path.join(other, "train", "000002.png")
    before = os.stat(png).st_mtime_ns
    make_shapes(other, num_train=30, num_val=6)  # same parameters: reused, not rewritten
    assert os.stat(png).st_mtime_ns == before
    make_shapes(other, num_train=30, num_val=6, seed=1)  # different parameters: regenerated
    with open(os.path.join(shapes, "annotations", "instances_train.json")) as f, \
            open(os.path.join(other, "annotations", "instances_train.json")) as g:
        assert f.read() != g.read()


def test_shapes_json_and_label_mapping(shapes):
    coco = COCO(os.path.join(shapes, "annotations", "instances_train.json"))
    assert sorted(coco.getCatIds()) == [1, 3, 7]
    anns = list(coco.anns.values())
    kinds = {type(a["segmentation"]) for a in anns}
    assert kinds == {list, dict}  # polygons and RLE
    assert sum(a["iscrowd"] for a in anns) == 1 and any(not coco.imgToAnns[i] for i in coco.imgs)
    ds = CocoDataset(os.path.join(shapes, "annotations", "instances_train.json"), os.path.join(shapes, "train"),
                     min_size=128)  # the images are 128 x 160: scale 1
    assert ds.cat_ids == [1, 3, 7] and ds.class_names == ["circle", "square", "triangle"] and ds.num_classes == 4
    for index in range(8):
        _, target = ds[index]
        gt = [a for a in coco.imgToAnns[target["image_id"]] if not a["iscrowd"]]
        assert len(gt) == len(target["labels"])
        assert int(target["masks"].sum(0).max()) <= 1  # visible parts: no pixel belongs to two objects
        for ann, label, box, mask in zip(gt, target["labels"], target["boxes"], target["masks"]):
            assert ds.cat_ids[label - 1] == ann["category_id"]  # label <-> original id round trip
            assert torch.equal(mask_box(mask), box) and int(mask.sum()) == ann["area"]


def test_subset_is_deterministic(shapes):
    args = (os.path.join(shapes, "annotations", "instances_train.json"), os.path.join(shapes, "train"))
    a, b = CocoDataset(*args, subset=8, subset_seed=0), CocoDataset(*args, subset=8, subset_seed=0)
    c = CocoDataset(*args, subset=8, subset_seed=1)
    assert a.image_ids == b.image_ids and a.image_ids != c.image_ids and len(a) == 8 and len(c) == 8
    assert set(a.image_ids) <= set(range(1, 31))


def test_build_dataset_resolves_paths(tiny, tmp_path, monkeypatch):
    root = tmp_path / "cocoroot"
    (root / "annotations").mkdir(parents=True)
    os.symlink(tiny["dir"], root / "val2017")
    os.symlink(tiny["ann"], root / "annotations" / "instances_val2017.json")
    ds = build_dataset(str(root), "val", train=False, min_size=40)
    assert isinstance(ds, CocoDataset) and ds.image_dir == str(root / "val2017") and len(ds) == 3
    assert len(build_dataset("ignored", "val", False, ann=tiny["ann"], images=tiny["dir"])) == 3
    one_line_error("--val-ann and --val-images must be given together", build_dataset, "ignored", "val", False,
                   ann=tiny["ann"])  # the flags of train.py and evaluate.py
    with pytest.raises(DataError, match="instances_train"):
        build_dataset(str(root), "train", train=True)
    monkeypatch.chdir(tmp_path)
    ds = build_dataset("shapes", "val", train=False)
    assert ds.cat_ids == [1, 3, 7] and len(ds) == 50 and os.path.isfile(tmp_path / "data_cache/shapes/shapes.json")


def one_line_error(match, fn, *args, **kwargs):
    with pytest.raises(DataError, match=match) as info:
        fn(*args, **kwargs)
    assert "\n" not in str(info.value)


def test_missing_image_file(tmp_path):
    ann = write_json(tmp_path / "a.json", [{"id": 9, "file_name": "nope.png", "height": 4, "width": 4}], [])
    one_line_error(os.path.join(str(tmp_path), "nope.png"), CocoDataset, ann, str(tmp_path))


def test_an_image_path_that_is_not_a_file(tmp_path):
    (tmp_path / "folder.png").mkdir()
    ann = write_json(tmp_path / "a.json", [{"id": 9, "file_name": "folder.png", "height": 4, "width": 4}], [])
    one_line_error(r"not a regular file .*folder\.png \(image id 9", CocoDataset, ann, str(tmp_path))


def test_corrupt_image(tmp_path):
    (tmp_path / "bad.png").write_bytes(b"this is not a png at all")
    ds = CocoDataset(write_json(tmp_path / "a.json", [{"id": 1, "file_name": "bad.png", "height": 4, "width": 4}],
                                []), str(tmp_path))
    one_line_error("corrupt image .*bad.png", ds.__getitem__, 0)


def test_boxes_are_clipped_to_the_image_and_eval_fields_filled(tmp_path, capsys):
    # An 8 x 8 image: box 7 reaches past the right and bottom edges, box 8 lies wholly outside. Neither json record
    # has iscrowd or area, which COCOeval needs: they get COCO's meaning, 0 and the box's area.
    write_image(tmp_path / "1.png", 8, 8)
    anns = [{"id": 7, "image_id": 1, "category_id": 5, "bbox": [6, 5, 10, 12], "segmentation": [[6, 5, 8, 5, 8, 8]]},
            {"id": 8, "image_id": 1, "category_id": 5, "bbox": [20, 20, 4, 4],
             "segmentation": [[20, 20, 24, 20, 24, 24]]}]
    path = write_json(tmp_path / "a.json", [{"id": 1, "file_name": "1.png", "height": 8, "width": 8}], anns,
                      categories=[{"id": 5, "name": "b"}])
    ds = CocoDataset(path, str(tmp_path), min_size=8)
    assert "dropped 1 annotations with no area inside their image" in capsys.readouterr().out
    assert ds[0][1]["boxes"].tolist() == [[6, 5, 8, 8]]  # x2 = min(16, 8), y2 = min(17, 8)
    assert (ds.coco.anns[7]["iscrowd"], ds.coco.anns[7]["area"]) == (0, 120)  # w x h of the json's box


def test_16_bit_image_is_refused(tmp_path):
    # PIL's convert("RGB") clips 16-bit values to 255: the picture would silently become white.
    Image.fromarray(np.full((4, 4), 40000, np.uint16)).save(tmp_path / "deep.png")
    ds = CocoDataset(write_json(tmp_path / "a.json", [{"id": 1, "file_name": "deep.png", "height": 4, "width": 4}],
                                []), str(tmp_path))
    one_line_error(r"deep\.png: a I;16 \(16/32-bit integer\) image", ds.__getitem__, 0)


def test_empty_dataset(tmp_path):
    one_line_error(r"empty\.json: empty dataset", CocoDataset, write_json(tmp_path / "empty.json", [], []),
                   str(tmp_path))
    write_image(tmp_path / "1.png", 4, 4)
    path = write_json(tmp_path / "one.json", [{"id": 1, "file_name": "1.png", "height": 4, "width": 4}], [])
    one_line_error(r"one\.json: empty dataset, 0 images after subset=0", CocoDataset, path, str(tmp_path), subset=0)


def test_unknown_data_path(tmp_path):
    one_line_error("not 'shapes', a PennFudanPed folder.*looked for .*instances_val", build_dataset,
                   str(tmp_path / "nowhere"), "val", False)


@pytest.mark.skipif(not os.path.isdir(PENNFUDAN), reason=f"PennFudanPed not found at {PENNFUDAN}")
def test_pennfudan_split_masks_and_coco():
    names = sorted(os.listdir(os.path.join(PENNFUDAN, "PNGImages")))
    train, val = PennFudanDataset(PENNFUDAN, "train"), PennFudanDataset(PENNFUDAN, "val")
    assert len(train) == 127 and len(val) == 43
    assert [val.coco.imgs[i]["file_name"] for i in val.image_ids] == names[0::4]
    assert {train.coco.imgs[i]["file_name"] for i in train.image_ids} == set(names) - set(names[0::4])
    assert val.cat_ids == [1] and val.num_classes == 2 and len(val.coco.getCatIds()) == 1
    assert len(train.coco.anns) + len(val.coco.anns) == 423  # every pedestrian of the release (SOURCES.md)
    ped = np.array(Image.open(os.path.join(PENNFUDAN, "PedMasks", names[4][:-4] + "_mask.png")))
    count = int(ped.max())
    assert len(val.coco.imgToAnns[val.image_ids[1]]) == count
    at_scale_1 = PennFudanDataset(PENNFUDAN, "val", min_size=min(ped.shape), max_size=10_000)
    _, target = at_scale_1[1]  # names[4]
    assert target["size"] == ped.shape and target["labels"].tolist() == [1] * count
    for k in range(1, count + 1):
        assert torch.equal(target["masks"][k - 1], torch.from_numpy((ped == k).astype(np.uint8)))
        assert torch.equal(mask_box(target["masks"][k - 1]), target["boxes"][k - 1])


@pytest.mark.skipif(not os.path.isdir(COCO_SUBSET), reason=f"coco_subset not found at {COCO_SUBSET}")
def test_coco_subset_loads():
    ds = build_dataset(COCO_SUBSET, "val", train=True, min_size=(256, 320), max_size=512)
    assert isinstance(ds, CocoDataset) and len(ds) == 50 and ds.num_classes == 81 and max(ds.cat_ids) == 90
    for image_id in (397133, 226111):  # 226111 has no annotations
        image, target = ds[ds.image_ids.index(image_id)]
        gt = [a for a in ds.coco.imgToAnns[image_id] if not a["iscrowd"] and a["bbox"][2] > 0 and a["bbox"][3] > 0]
        assert len(target["boxes"]) == len(gt) and target["masks"].shape[1:] == image.shape[1:]
        assert 256 <= min(image.shape[1:]) <= 320 and max(image.shape[1:]) <= 512
        cat_ids = sorted(ds.cat_ids[label - 1] for label in target["labels"].tolist())
        assert cat_ids == sorted(a["category_id"] for a in gt)


def test_float_image_and_decompression_bomb_are_refused(tmp_path, monkeypatch):
    # mode F (32-bit float, e.g. a TIFF of values in [0, 1]): convert("RGB") would give an all-black picture
    Image.fromarray(np.full((4, 4), 0.5, np.float32)).save(tmp_path / "float.tif")
    write_image(tmp_path / "1.png", 8, 8)
    images = [{"id": 1, "file_name": "float.tif", "height": 4, "width": 4},
              {"id": 2, "file_name": "1.png", "height": 8, "width": 8}]
    ds = CocoDataset(write_json(tmp_path / "a.json", images, []), str(tmp_path))
    one_line_error(r"float\.tif: a F \(32-bit float\) image; convert it to 8-bit RGB", ds.__getitem__, 0)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 10)  # 64 pixels: more than twice PIL's limit, as a bomb
    one_line_error(r"1\.png: Image size \(64 pixels\) exceeds limit", ds.__getitem__, 1)
