"""Run a train.py checkpoint on your own images: one picture of its detections per image, and a COCO results json.

    python predict.py --checkpoint runs/demo/model_0000400.pth --input photo.jpg       # -> runs/demo/predictions/
    python predict.py --checkpoint CKPT --input photos/ --out pictures/ --score-thresh 0.7 --json results.json

--input is one image or a folder, whose images (.jpg, .jpeg, .png, .bmp, .gif, .tif, .tiff, .webp; not its
subfolders) are taken in sorted order. Each goes through evaluation's preprocessing exactly (data.load_image, then
data.transform's resize to the run's --min-size / --max-size and normalization, data.collate's padding), and the
model is rebuilt as evaluate.py rebuilds it. No data set is needed: the class names, keypoint names and skeleton
come from the checkpoint (one written before train.py recorded them gets numbered classes "class 1", "class 2", ...).

Output: --out (default: a predictions/ folder next to the checkpoint) gets NAME.png per image NAME.jpg (NAME.jpg.png
when two inputs share a name): the detections scoring at least --score-thresh, masks at --mask-thresh, keypoints
joined by the skeleton (draw.py). Each image gets one printed line. --json writes {"categories": [{"id", "name"}],
"results": [...]}: evaluate.py's COCO results (bbox [x, y, w, h] in the image's pixels, score, category_id,
segmentation as RLE of the mask at --mask-thresh, keypoints), of the detections at --score-thresh or above, with
image_id the image's 0-based position in the sorted input and its "file_name" added to each result.
An image that cannot be read is skipped with a warning; if none can, the program stops with an error.
"""
import argparse
import collections
import json
import os
import sys

import torch

import data
import draw
import evaluate
from flags import MAX_SIDE, at_most, device_name, folder, fraction, output_file, run_script

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp")


def find_images(path):
    """--input: [path] for a file, the images of a folder in sorted order; a one-line error when there are none."""
    if os.path.isfile(path):
        return [path]
    if not os.path.isdir(path):
        sys.exit(f"error: --input {path} does not exist")
    names = sorted(n for n in os.listdir(path) if n.lower().endswith(IMAGE_EXTENSIONS)
                   and os.path.isfile(os.path.join(path, n)))
    if not names:
        sys.exit(f"error: --input {path} holds no images ({', '.join(IMAGE_EXTENSIONS)})")
    return [os.path.join(path, n) for n in names]


def picture_names(paths):
    """NAME.png for each NAME.ext; NAME.ext.png where two inputs share their NAME (a.jpg and a.png)."""
    stems = [os.path.splitext(os.path.basename(p))[0] for p in paths]
    shared = collections.Counter(stems)
    return [(stem if shared[stem] == 1 else os.path.basename(p)) + ".png" for p, stem in zip(paths, stems)]


@torch.no_grad()
def predict_image(model, path, min_size, max_size, device):
    """The model's detections on one image file in its own pixels, preprocessed as in evaluation, and the image as
    (H0, W0, 3) uint8 for drawing. data.DataError names a file that cannot be read."""
    image = data.load_image(path)  # (3, H0, W0) in [0, 1]
    h0, w0 = image.shape[-2:]
    if min(data.resized_size(h0, w0, min_size, max_size)) < 1:
        raise data.DataError(f"{path} is {w0}x{h0}: resized to {min_size} (longer side at most {max_size}), a side "
                             f"rounds to 0 pixels")
    resized, _, _ = data.transform(image, torch.zeros(0, 4), None, min_size, max_size)  # no flip, normalized
    batch, image_sizes, _ = data.collate([(resized, None)])  # (1, 3, H, W) padded to multiples of 32
    (out,) = model(batch.to(device), image_sizes, original_sizes=[(h0, w0)])
    pixels = (image * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()  # (3, H0, W0) -> (H0, W0, 3), exact
    return {k: v.cpu() for k, v in out.items()}, pixels


def draw_picture(png, pixels, out, class_names, skeleton, score_thresh, best_score, title):
    """One PNG of the image with its detections (out, already thresholded); an image under 320 pixels on its longer
    side is enlarged by a whole factor (up to 4) towards 640."""
    h0, w0 = pixels.shape[:2]
    fig, (ax,) = draw.figure(h0, w0, zoom=min(4, max(1, 640 // max(h0, w0))))
    draw.draw_instances(ax, pixels, out["boxes"], out["labels"], class_names, scores=out["scores"],
                        masks=out["masks"][:, 0] if "masks" in out else None, keypoints=out.get("keypoints"),
                        skeleton=skeleton, title=title, score_thresh=score_thresh, best_score=best_score)
    draw.save(fig, png)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="a model_*.pth written by train.py")
    p.add_argument("--input", required=True, help="an image, or a folder of images")
    p.add_argument("--out", type=folder, help="folder for the pictures (default: predictions/ next to the checkpoint)")
    p.add_argument("--score-thresh", type=fraction, default=0.5, help="keep detections scoring at least this (0.5)")
    p.add_argument("--mask-thresh", type=fraction, default=0.5, help="mask probability threshold (Mask R-CNN: 0.5)")
    p.add_argument("--json", type=output_file, help="also write the detections here as COCO results")
    p.add_argument("--device", type=device_name, default="cuda" if torch.cuda.is_available() else "cpu",
                   help="cpu or cuda")
    p.add_argument("--min-size", type=at_most(MAX_SIDE), help="shorter side (default: the checkpoint's)")
    p.add_argument("--max-size", type=at_most(MAX_SIDE), help="cap on the longer side (default: the checkpoint's)")
    args = p.parse_args(argv)

    paths = find_images(args.input)
    ckpt = evaluate.read_run(args.checkpoint)
    heads, classes, skeleton = evaluate.describe_data(args.checkpoint, ckpt)
    keypoint_fields = {}  # --json's categories of a keypoint model: COCO's keypoint names and 1-based skeleton
    if heads.num_keypoints:
        names = ((ckpt.get("data") or {}).get("keypoint_names")
                 or [f"keypoint {j + 1}" for j in range(heads.num_keypoints)])  # a checkpoint that records none
        keypoint_fields = {"keypoints": names, "skeleton": [[a + 1, b + 1] for a, b in skeleton]}
    class_names = [name for _, name in classes]
    device = torch.device(args.device)
    model = evaluate.run_model(args.checkpoint, ckpt, heads).to(device).eval()
    min_size, max_size = args.min_size or ckpt["args"]["min_size"], args.max_size or ckpt["args"]["max_size"]
    out_dir = args.out or os.path.join(os.path.dirname(os.path.abspath(args.checkpoint)), "predictions")
    if any(os.path.realpath(os.path.dirname(path)) == os.path.realpath(out_dir) for path in paths):
        sys.exit(f"error: --out {out_dir} holds the input images: their pictures would overwrite them; give another "
                 f"--out")
    try:
        os.makedirs(out_dir, exist_ok=True)
    except OSError as e:
        sys.exit(f"error: --out {out_dir}: cannot create it ({e.strerror})")

    drawn, results = [], []
    for image_id, (path, name) in enumerate(zip(paths, picture_names(paths))):
        try:
            out, pixels = predict_image(model, path, min_size, max_size, device)
        except data.DataError as e:
            print(f"warning: skipped {e}")
            continue
        best_score = out["scores"].max().item() if len(out["scores"]) else None
        keep = out["scores"] >= args.score_thresh
        out = {k: v[keep] for k, v in out.items()}  # every entry holds one row per detection
        if "masks" in out:  # (D, 1, H0, W0) probabilities -> binary at --mask-thresh, for the picture and the json
            out["masks"] = (out["masks"] > args.mask_thresh).float()
        png = os.path.join(out_dir, name)
        found = [f"{class_names[label - 1]} {score:.2f}" for label, score in zip(out["labels"].tolist(),
                                                                              out["scores"].tolist())]
        count = f"{len(found)} detection{'s' * (len(found) != 1)}"
        title = f"{os.path.basename(path)}: {count}, score >= {args.score_thresh:.2f}"
        draw_picture(png, pixels, out, class_names, skeleton, args.score_thresh, best_score, title)
        if found:
            more = f", ... {len(found) - 8} more" if len(found) > 8 else ""
            print(f"{os.path.basename(path)}: {count} ({', '.join(found[:8])}{more})")
        else:
            print(f"{os.path.basename(path)}: " + draw.empty_note(out["scores"], args.score_thresh,
                                                                  best_score).replace("\n", " "))
        results += [dict(r, file_name=os.path.basename(path))
                    for r in evaluate.to_coco_results(out, image_id, [c for c, _ in classes])]
        drawn.append({"image": path, "picture": png, "boxes": out["boxes"].tolist(),
                      "labels": [class_names[label - 1] for label in out["labels"].tolist()],
                      "scores": out["scores"].tolist()})
    if not drawn:
        sys.exit(f"error: none of the {len(paths)} image(s) of --input {args.input} could be read")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"categories": [dict(id=c, name=n, **keypoint_fields) for c, n in classes], "results": results},
                      f)
    skipped = f" ({len(paths) - len(drawn)} skipped)" if len(drawn) < len(paths) else ""
    print(f"wrote {len(drawn)} picture(s) to {out_dir}{skipped}" + (f" and {len(results)} results to {args.json}"
                                                                   if args.json else ""))
    return drawn


if __name__ == "__main__":
    run_script(main)
