"""The repository's own default data: a synthetic COCO-format "shapes" set, generated, so a fresh clone runs.

Circles, squares and triangles on a noisy textured background, with occlusion, polygons and RLE masks, an iscrowd
region and empty images: small enough for the tiny model to learn on a laptop CPU in minutes (`make demo`), varied
enough to exercise every path of the COCO loader and of COCO evaluation. Nothing is downloaded.
"""
import json
import os
import shutil

import numpy as np
import pycocotools.mask as mask_utils
from PIL import Image

SHAPES_CATEGORIES = ({"id": 1, "name": "circle"}, {"id": 3, "name": "square"}, {"id": 7, "name": "triangle"})


def _draw_shapes(rng, h, w, num_objects):
    """One synthetic image (h, w, 3) uint8 and its objects [(category id, polygon or None, visible mask (h, w))]."""
    coarse = rng.uniform(20, 120, (4, 5, 3)).astype(np.uint8)  # a low-frequency colour field as texture
    image = np.asarray(Image.fromarray(coarse).resize((w, h), Image.BILINEAR), np.float32)
    image = image + rng.normal(0, 12, (h, w, 3))  # pixel noise
    owner = np.full((h, w), -1)  # which object is visible at each pixel: later shapes paint over earlier ones
    yy, xx = np.mgrid[:h, :w] + 0.5  # pixel centres
    objects = []
    for k in range(num_objects):
        cat_id = SHAPES_CATEGORIES[rng.integers(3)]["id"]
        s = rng.uniform(20, 60)  # object size in pixels, large enough for a tiny model
        cx, cy = rng.uniform(s / 2, w - s / 2), rng.uniform(s / 2, h - s / 2)
        if cat_id == 1:  # circle, stored as RLE
            polygon, full = None, (xx - cx) ** 2 + (yy - cy) ** 2 <= (s / 2) ** 2
        else:  # square or triangle, stored as a polygon and rasterized by pycocotools, so pixels == annotation
            corners = [(-1, -1), (1, -1), (1, 1), (-1, 1)] if cat_id == 3 else [(0, -1), (1, 1), (-1, 1)]
            polygon = [round(float(c + d * s / 2), 1) for dx, dy in corners for c, d in ((cx, dx), (cy, dy))]
            full = mask_utils.decode(mask_utils.frPyObjects([polygon], h, w))[:, :, 0].astype(bool)
        colour = rng.permutation([rng.uniform(180, 255), rng.uniform(0, 60), rng.uniform(0, 255)])  # saturated
        image[full] = colour + rng.normal(0, 8, (int(full.sum()), 3))
        owner[full] = k
        objects.append((cat_id, polygon, full))
    objects = [(cat_id, polygon if (owner[full] == k).all() else None, owner == k)  # polygon only if unoccluded
               for k, (cat_id, polygon, full) in enumerate(objects)]
    return np.clip(image, 0, 255).astype(np.uint8), objects


def make_shapes(root, num_train=300, num_val=50, image_size=(128, 160), seed=0, min_visible=60):
    """Write a deterministic synthetic COCO-format set: annotations/instances_{train,val}.json, {train,val}/*.png.

    Classes circle, square, triangle with non-contiguous ids 1, 3, 7 (to exercise the label mapping); 1-4 objects of
    20-60 px and random colour on a noisy textured background; every 25th image is empty; train image 2's last object
    (drawn on top) is an iscrowd region if visible enough to be annotated, as it is with the defaults. Occlusion:
    masks and boxes are the visible part; objects with fewer than min_visible visible pixels are not annotated.
    Unoccluded squares/triangles are stored as polygons, the rest as RLE.
    Idempotent: a shapes.json stamp of the parameters, written last, means the folder is complete and reused.
    """
    h, w = image_size
    params = {"generator": 1, "num_train": num_train, "num_val": num_val, "image_size": [h, w], "seed": seed,
              "min_visible": min_visible}
    stamp = os.path.join(root, "shapes.json")
    if os.path.isfile(stamp):
        with open(stamp) as f:
            if json.load(f) == params:
                return root
    os.makedirs(os.path.join(root, "annotations"), exist_ok=True)
    for split, count, split_key in (("train", num_train, 0), ("val", num_val, 1)):
        rng = np.random.default_rng([seed, split_key])
        shutil.rmtree(os.path.join(root, split), ignore_errors=True)
        os.makedirs(os.path.join(root, split))
        images, annotations = [], []
        for i in range(count):
            image, objects = _draw_shapes(rng, h, w, 0 if i % 25 == 0 else int(rng.integers(1, 5)))
            file_name = f"{i + 1:06d}.png"
            Image.fromarray(image).save(os.path.join(root, split, file_name))
            images.append({"id": i + 1, "file_name": file_name, "height": h, "width": w})
            for k, (cat_id, polygon, visible) in enumerate(objects):
                if visible.sum() < min_visible:
                    continue  # too occluded to annotate (its few pixels stay painted, as in real data)
                crowd = int(split == "train" and i == 1 and k == len(objects) - 1)
                rle = mask_utils.encode(np.asfortranarray(visible, dtype=np.uint8))
                segmentation = [polygon] if polygon is not None and not crowd else {
                    "size": rle["size"], "counts": rle["counts"].decode("ascii")}
                annotations.append({"id": len(annotations) + 1, "image_id": i + 1, "category_id": cat_id,
                                    "segmentation": segmentation, "area": float(visible.sum()),
                                    "bbox": mask_utils.toBbox(rle).tolist(), "iscrowd": crowd})
        with open(os.path.join(root, "annotations", f"instances_{split}.json"), "w") as f:
            json.dump({"images": images, "annotations": annotations, "categories": list(SHAPES_CATEGORIES)}, f)
    with open(stamp, "w") as f:
        json.dump(params, f)
    return root
