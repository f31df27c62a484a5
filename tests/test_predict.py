"""predict.py: a checkpoint on a folder of images, preprocessed as evaluation does, named from the checkpoint alone."""
import json
import shutil

import pytest
import torch

import evaluate
import predict
import train
from shapes import make_shapes


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A tiny model trained for 2 iterations on a small shapes set: (its checkpoint, the validation image folder)."""
    shapes = tmp_path_factory.mktemp("shapes")
    make_shapes(str(shapes), num_train=4, num_val=3, seed=0)
    out = shapes / "run"
    train.main(["--train-ann", str(shapes / "annotations" / "instances_train.json"),
                "--train-images", str(shapes / "train"),
                "--val-ann", str(shapes / "annotations" / "instances_val.json"), "--val-images", str(shapes / "val"),
                "--data", "custom", "--preset", "tiny", "--device", "cpu", "--batch-size", "2", "--min-size", "96",
                "--workers", "0", "--max-iters", "2", "--no-eval", "--output-dir", str(out)])
    return out / "model_0000002.pth", shapes / "val"


def test_a_picture_per_image_and_the_results_of_evaluation(run, tmp_path, capsys):
    ckpt, images = run
    # score threshold 0: the barely trained model's every detection, so that there is something to compare
    drawn = predict.main(["--checkpoint", str(ckpt), "--input", str(images), "--out", str(tmp_path / "pictures"),
                          "--score-thresh", "0", "--json", str(tmp_path / "results.json"), "--device", "cpu"])
    names = sorted(p.name for p in images.iterdir())
    assert sorted(p.name for p in (tmp_path / "pictures").iterdir()) == names     # 000001.png -> 000001.png
    assert [d["image"] for d in drawn] == [str(images / n) for n in names]
    printed = capsys.readouterr().out.splitlines()
    for line, name, d in zip(printed, names, drawn):  # "000001.png: 12 detections (circle 0.34, ...)"
        assert line.startswith(f"{name}: {len(d['boxes'])} detection")
        assert f"({d['labels'][0]} {d['scores'][0]:.2f}" in line
    assert printed[-1] == f"wrote 3 picture(s) to {tmp_path / 'pictures'} and " \
                          f"{sum(len(d['boxes']) for d in drawn)} results to {tmp_path / 'results.json'}"

    written = json.loads((tmp_path / "results.json").read_text())
    assert written["categories"] == [{"id": 1, "name": "circle"}, {"id": 3, "name": "square"},
                                     {"id": 7, "name": "triangle"}]
    # evaluate.py on the same images (their json's image ids 1..3 are the sorted files): the same results
    model, dataset = evaluate.load_run(str(ckpt))
    expected = evaluate.predict(model, dataset, torch.device("cpu"), workers=0)
    assert expected, "the model detects nothing: nothing compared"
    file_names = {i: dataset.coco.imgs[i]["file_name"] for i in dataset.image_ids}
    for r in expected:
        r["file_name"], r["image_id"] = file_names[r["image_id"]], names.index(file_names[r["image_id"]])
    assert written["results"] == expected                                     # boxes, scores, classes, masks


def test_names_come_from_the_checkpoint_without_the_data(run, tmp_path, capsys):
    ckpt, images = run
    state = torch.load(ckpt, weights_only=False)
    state["args"].update(val_ann="/gone/val.json", val_images="/gone/val", train_ann="/gone/train.json")
    torch.save(state, tmp_path / "model_0000002.pth")
    image = tmp_path / "photo.png"
    shutil.copy(images / "000002.png", image)
    (drawn,) = predict.main(["--checkpoint", str(tmp_path / "model_0000002.pth"), "--input", str(image),
                             "--score-thresh", "0", "--device", "cpu"])
    assert drawn["picture"] == str(tmp_path / "predictions" / "photo.png")  # the default: next to the checkpoint
    assert (tmp_path / "predictions" / "photo.png").is_file()
    assert drawn["labels"] and set(drawn["labels"]) <= {"circle", "square", "triangle"}
    assert capsys.readouterr().out.startswith("photo.png: ")


def test_an_older_checkpoint_without_data_gets_numbered_classes(run, tmp_path, capsys):
    ckpt, images = run
    state = torch.load(ckpt, weights_only=False)
    del state["data"]  # written before train.py recorded its data
    torch.save(state, tmp_path / "old.pth")
    drawn = predict.main(["--checkpoint", str(tmp_path / "old.pth"), "--input", str(images), "--score-thresh", "0",
                          "--out", str(tmp_path / "pictures"), "--json", str(tmp_path / "r.json"), "--device", "cpu"])
    first = capsys.readouterr().out.splitlines()[0]
    assert first == (f"note: checkpoint {tmp_path / 'old.pth'} records no class names (written before train.py kept "
                     f"them): the classes are numbered class 1..class 3")
    assert {label for d in drawn for label in d["labels"]} <= {"class 1", "class 2", "class 3"}
    written = json.loads((tmp_path / "r.json").read_text())
    assert written["categories"] == [{"id": c, "name": f"class {c}"} for c in (1, 2, 3)]
    assert {r["category_id"] for r in written["results"]} <= {1, 2, 3} and written["results"]


def test_the_heads_and_the_skeleton_come_from_the_checkpoint():
    state = {"roi_heads.box_predictor.cls_score.weight": torch.zeros(2, 8),     # 1 class + background
             "roi_heads.keypoint_head.deconv.bias": torch.zeros(5)}             # 5 keypoints, no mask head
    ckpt = {"model": state, "data": {"classes": [[1, "person"]], "keypoint_skeleton": [[0, 1], [1, 4]]}}
    heads, classes, skeleton = evaluate.describe_data("kp.pth", ckpt)
    assert (heads.num_classes, heads.has_masks, heads.num_keypoints) == (2, False, 5)
    assert classes == [[1, "person"]] and skeleton == [[0, 1], [1, 4]]


def test_an_unreadable_image_is_skipped_with_a_warning(run, tmp_path, capsys):
    ckpt, images = run
    folder = tmp_path / "in"
    shutil.copytree(images, folder)
    (folder / "000000.jpg").write_bytes(b"not a picture")                      # sorted first
    drawn = predict.main(["--checkpoint", str(ckpt), "--input", str(folder), "--out", str(tmp_path / "out"),
                          "--device", "cpu"])
    assert len(drawn) == 3
    printed = capsys.readouterr().out.splitlines()
    assert printed[0].startswith(f"warning: skipped unreadable or corrupt image {folder / '000000.jpg'}")
    assert printed[-1] == f"wrote 3 picture(s) to {tmp_path / 'out'} (1 skipped)"
    for good in ("000001.png", "000002.png", "000003.png"):
        (folder / good).unlink()
    with pytest.raises(SystemExit, match=r"^error: none of the 1 image\(s\) of --input .*in could be read$"):
        predict.main(["--checkpoint", str(ckpt), "--input", str(folder), "--out", str(tmp_path / "out"),
                      "--device", "cpu"])


@pytest.mark.parametrize("case, error", [
    ("missing input", r"^error: --input .*missing does not exist$"),
    ("empty folder", r"^error: --input .*empty holds no images \(\.jpg, \.jpeg, \.png"),
    ("not a checkpoint", r"^error: checkpoint .*notes\.txt is not a PyTorch checkpoint"),
    ("not train.py's", r"^error: checkpoint .*other\.pth has no model, args\.preset.*: not a model_\*\.pth written "
                       r"by train\.py$"),
    ("out is the input", r"^error: --out .* holds the input images: their pictures would overwrite them"),
    ("out under a file", r"^error: --out .*notes\.txt/sub: cannot create it \(Not a directory\)$"),
])
def test_bad_input_is_a_one_line_error(run, tmp_path, case, error):
    ckpt, images = run
    (tmp_path / "empty").mkdir()
    (tmp_path / "notes.txt").write_text("hello")
    torch.save({"weights": torch.zeros(3)}, tmp_path / "other.pth")
    flags = {"missing input": ["--input", str(tmp_path / "missing")],
             "empty folder": ["--input", str(tmp_path / "empty")],
             "not a checkpoint": ["--checkpoint", str(tmp_path / "notes.txt")],
             "not train.py's": ["--checkpoint", str(tmp_path / "other.pth")],
             "out is the input": ["--out", str(images)],
             "out under a file": ["--out", str(tmp_path / "notes.txt" / "sub")]}[case]
    argv = ["--checkpoint", str(ckpt), "--input", str(images), "--out", str(tmp_path / "out"), *flags]
    before = sorted((p.name, p.stat().st_mtime_ns) for p in images.iterdir())
    with pytest.raises(SystemExit, match=error):
        predict.main(argv)
    assert sorted((p.name, p.stat().st_mtime_ns) for p in images.iterdir()) == before  # nothing written there


@pytest.mark.parametrize("flags, error", [
    (["--score-thresh", "2"], "argument --score-thresh: expected a number in [0, 1], got '2'"),
    (["--mask-thresh", "-1"], "argument --mask-thresh: expected a non-negative number, got '-1'"),
    (["--out", "FILE"], "argument --out: FILE is a file, not a folder"),
    (["--device", "mps"], "argument --device: expected cpu, cuda or cuda:N, got 'mps'"),
])
def test_bad_flags_are_one_line_usage_errors(tmp_path, capsys, flags, error):
    (tmp_path / "FILE").write_text("")
    flags = [str(tmp_path / "FILE") if f == "FILE" else f for f in flags]
    with pytest.raises(SystemExit):
        predict.main(["--checkpoint", "x.pth", "--input", str(tmp_path), *flags])
    assert error.replace("FILE", str(tmp_path / "FILE")) in capsys.readouterr().err
