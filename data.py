"""Data: COCO-format datasets, PennFudanPed, PASCAL VOC, resize + flip, batching, samplers (the synthetic set:
shapes.py). Every data set holds its ground truth as a pycocotools COCO, so that evaluate.py scores any of them alike.

Mask R-CNN (He et al. 2017, arXiv:1703.06870) Sec. 3.1: the shorter image side is resized to 800 px (Detectron caps
the longer side at 1333). Rethinking ImageNet Pre-training (He, Girshick, Dollar 2019, arXiv:1811.08883) Sec. 4:
horizontal flip is the only training augmentation. Sec. 5 adds scale jitter, the shorter side drawn from
[640, 800] (5.1, enhanced baselines, Fig. 5) or [512, 800] (5.2, the 35k-image recipe).
Resizing and normalization happen here, visible to the reader, not inside the model.

Shapes: N images in a batch, G objects in an image, H0,W0 original image size, h,w resized size,
        H,W padded batch size (multiples of 32), K classes including background (label 0).
A target is {"boxes" (G,4) float32 xyxy in resized pixels, "labels" (G,) int64 in 1..K-1, "masks" (G,h,w) uint8,
             "image_id" int, "orig_size" (H0, W0), "size" (h, w)}; box-only data (PASCAL VOC) has no "masks"; a COCO
             person-keypoints json adds "keypoints" (G,J,3) float32: J keypoints (x, y, v) in resized pixels,
             v = 0 unlabelled, 1 hidden, 2 seen.
"""
import contextlib
import glob
import io
import json
import math
import os
import xml.etree.ElementTree as ET

import numpy as np
import pycocotools.mask as mask_utils
import torch
import torch.nn.functional as F
from PIL import Image
from pycocotools.coco import COCO

from coco_json import DataError, check_annotation, check_records, is_numbers
from shapes import make_shapes

# RGB in [0, 1] minus the ImageNet mean, over its std: torchvision's, so its ImageNet checkpoints load as they are.
# Departure: Detectron (the paper's code) took BGR in 0..255 minus the mean with std 1 (the Caffe models' input);
# Detectron2's scratch configs divide by the std too (PIXEL_STD 57.375, 57.12, 58.395 = 255 x these).
IMAGE_MEAN = (0.485, 0.456, 0.406)
IMAGE_STD = (0.229, 0.224, 0.225)
# COCO's per-keypoint OKS sigmas (cocodataset.org/#keypoints-eval, pycocotools' kpt_oks_sigmas): nose, eyes, ears,
# shoulders, elbows, wrists, hips, knees, ankles, in the order of person_keypoints_*.json.
COCO_KEYPOINT_SIGMAS = (.026, .025, .025, .035, .035, .079, .079, .072, .072, .062, .062, .107, .107, .087, .087,
                        .089, .089)


def _read_image(path, mode="RGB"):
    """(H0, W0, 3) uint8 array for mode "RGB"; mode None keeps the stored values; PIL errors become DataError."""
    try:
        with Image.open(path) as image:
            # convert("RGB") would clip 16/32-bit integers to 255 (all white) and floats in [0, 1] to 0 (all black)
            if mode and (image.mode.startswith("I") or image.mode == "F"):
                kind = "32-bit float" if image.mode == "F" else "16/32-bit integer"
                raise DataError(f"{path}: a {image.mode} ({kind}) image; convert it to 8-bit RGB")
            return np.array(image.convert(mode) if mode else image)
    except FileNotFoundError:
        raise DataError(f"missing image file {path}") from None
    except DataError:
        raise
    except Image.DecompressionBombError as e:
        raise DataError(f"{path}: {e}") from None
    except (OSError, SyntaxError, ValueError) as e:  # PIL raises all three for truncated or garbage files
        raise DataError(f"unreadable or corrupt image {path}: {e}") from None


def load_image(path):
    """The image file at path as (3, H0, W0) float32 RGB in [0, 1], as the model's input starts (then transform);
    DataError names a file that cannot be read."""
    return torch.from_numpy(_read_image(path)).permute(2, 0, 1).float() / 255  # (H0, W0, 3) -> (3, H0, W0)


def resized_size(h, w, min_size=800, max_size=1333):
    """Mask R-CNN Sec. 3.1: shorter side -> min_size, unless the longer side would pass max_size (Detectron rule).
    Sizes are rounded to the nearest pixel, as Detectron2 does. Departure from torchvision, which floors: 1066 instead
    of 1067 for 640 px; a 300x451 image at 256 becomes 256x385 here (padded to 416), 256x384 there."""
    scale = min(min_size / min(h, w), max_size / max(h, w))
    return int(round(h * scale)), int(round(w * scale))


def transform(image, boxes, masks, min_size=800, max_size=1333, flip=False):
    """Resize (bilinear image, nearest masks), optionally flip horizontally, normalize.
    image (3,H0,W0) float in [0,1], boxes (G,4) xyxy, masks (G,H0,W0) uint8 -> (3,h,w) normalized, (G,4), (G,h,w).
    masks may be None (box-only data) and stay None."""
    h0, w0 = image.shape[-2:]
    h, w = resized_size(h0, w0, min_size, max_size)
    image = F.interpolate(image[None], size=(h, w), mode="bilinear", align_corners=False)[0]  # (3, h, w)
    if masks is not None and len(masks):
        masks = F.interpolate(masks[None], size=(h, w), mode="nearest")[0]
    elif masks is not None:
        masks = masks.new_zeros((0, h, w))
    boxes = boxes * torch.tensor([w / w0, h / h0, w / w0, h / h0])  # x by w'/w, y by h'/h
    if flip:
        image, masks = image.flip(-1), masks.flip(-1) if masks is not None else None
        boxes = torch.stack([w - boxes[:, 2], boxes[:, 1], w - boxes[:, 0], boxes[:, 3]], dim=1)  # x1' = w - x2
    mean, std = torch.tensor(IMAGE_MEAN)[:, None, None], torch.tensor(IMAGE_STD)[:, None, None]  # (3, 1, 1)
    return (image - mean) / std, boxes, masks


def transform_keypoints(keypoints, orig_size, size, flip=False, flip_index=None):
    """keypoints (G, J, 3) as (x, y, v) in the (H0, W0) image -> the same in the resized (h, w), optionally flipped.

    A flip mirrors x like the boxes' x1' = w - x2 (as torchvision's reference and Detectron2; Detectron has w - x - 1)
    and swaps the keypoints at flip_index (J,), so that left_eye stays the person's left eye.
    Unlabelled keypoints (v = 0) stay (0, 0, 0).
    """
    (h0, w0), (h, w) = orig_size, size
    keypoints = keypoints * torch.tensor([w / w0, h / h0, 1.0])  # (G, J, 3): x by w/w0, y by h/h0
    if flip:
        keypoints = keypoints[:, flip_index]  # left_* <-> right_*
        keypoints[..., 0] = w - keypoints[..., 0]
        keypoints[keypoints[..., 2] == 0] = 0
    return keypoints


class _CocoStyleDataset(torch.utils.data.Dataset):
    """Ground truth held in a pycocotools COCO (so COCOeval works unchanged); shared by CocoDataset, PennFudanDataset
    and VOCDataset.

    Categories map to contiguous labels 1..K-1 (0 = background): label i + 1 <-> original id cat_ids[i].
    Training targets exclude crowd regions and boxes with no area inside their image (the others are clipped to it);
    `self.coco` keeps every annotation.
    An item is an int index or (index, aug_seed): all augmentation randomness (flip, scale jitter) comes from a
    torch.Generator seeded with aug_seed, so it does not depend on worker count or process (exact resume).
    A subclass with has_masks = False (PASCAL VOC) gives targets without "masks".
    """

    has_masks = True

    def _setup(self, data, source, image_dir, train, min_size, max_size, flip_prob, subset, subset_seed,
               keypoint_sigmas=None):
        check_records(data, source)  # the lists, their fields and types, unique ids: coco_json.py
        if not os.path.isdir(image_dir):
            raise DataError(f"image folder {image_dir} does not exist (for {source})")
        self.cat_ids = sorted(c["id"] for c in data["categories"])
        names = {c["id"]: c["name"] for c in data["categories"]}
        self.class_names = [names[c] for c in self.cat_ids]
        self.classes = [[c, names[c]] for c in self.cat_ids]  # what a checkpoint's labels stand for (checkpoint.py)
        self.num_classes = len(self.cat_ids) + 1  # + background
        self._label = {cat_id: i + 1 for i, cat_id in enumerate(self.cat_ids)}
        images = {image["id"]: image for image in data["images"]}
        self._anns = {image_id: [] for image_id in images}  # training targets per image id
        self._setup_keypoints(data, source, keypoint_sigmas)
        dropped = []
        for ann in data["annotations"]:
            culprit = f"{source}: annotation id {ann['id']}"
            if ann.get("category_id") not in self._label:
                raise DataError(f"{culprit} has unknown category_id {ann.get('category_id')}")
            if ann.get("image_id") not in images:
                raise DataError(f"{culprit} refers to unknown image id {ann.get('image_id')}")
            image = images[ann["image_id"]]
            check_annotation(ann, image, culprit, needs_segmentation=self.has_masks)
            if self.num_keypoints:
                self._keypoints[ann["id"]] = self._read_keypoints(ann, culprit)
            x, y, w, h = ann["bbox"]  # a box of no size, also once clipped to its image, is not a training target
            if min(x + w, image["width"]) <= max(x, 0) or min(y + h, image["height"]) <= max(y, 0):
                dropped.append(ann["id"])
            elif not ann["iscrowd"] and not ann.get("difficult", 0):  # crowd regions and VOC's "difficult"
                # objects are not training targets, only "ignore" regions for evaluation
                self._anns[ann["image_id"]].append(ann)
        if dropped:
            ids = ", ".join(map(str, dropped[:20])) + (", ..." if len(dropped) > 20 else "")
            print(f"dropped {len(dropped)} annotations with no area inside their image in {source}: ids {ids}")
        with contextlib.redirect_stdout(io.StringIO()):  # silence pycocotools' "creating index..."
            self.coco = COCO()
            self.coco.dataset = data
            self.coco.createIndex()
        # Images without annotations are kept as negatives. Departure: Detectron, Detectron2 and torchvision's
        # reference drop them from training (about 1k of COCO train2017's 118k images).
        image_ids = sorted(self._anns)
        if subset is not None and subset > len(image_ids):
            print(f"--train-subset {subset}: {source} has {len(image_ids)} images, all used")
        if subset is not None:  # a deterministic random subset, e.g. Rethinking's 35k/10k/1k-image experiments
            order = torch.randperm(len(image_ids), generator=torch.Generator().manual_seed(subset_seed))
            image_ids = sorted(image_ids[i] for i in order[:subset].tolist())
        if not image_ids:
            after = f" after subset={subset}" if subset is not None else ""
            raise DataError(f"{source}: empty dataset, 0 images{after}")
        self.image_ids = image_ids
        lo = min(min_size) if isinstance(min_size, (tuple, list)) else min_size
        for image_id in image_ids:
            info = self.coco.imgs[image_id]
            path = os.path.normpath(os.path.join(image_dir, info["file_name"]))
            inside = os.path.relpath(path, image_dir)
            if inside == os.pardir or inside.startswith(os.pardir + os.sep):  # absolute, or ../ out of the folder
                raise DataError(f"{source}: image id {image_id} has file_name {info['file_name']!r}, outside the image "
                                f"folder {image_dir}; give names relative to it")
            if not os.path.isfile(path):  # fail before training starts, not at iteration 40k
                what = "not a regular file" if os.path.exists(path) else "missing image file"
                raise DataError(f"{what} {path} (image id {image_id} in {source})")
            if min(resized_size(info["height"], info["width"], lo, max_size)) < 1:
                raise DataError(f"{source}: image id {image_id} ({info['file_name']}) is {info['width']}x"
                                f"{info['height']}: resized to a shorter side of {lo} with the longer at most "
                                f"{max_size}, a side rounds to 0 pixels")
        self.source, self.image_dir, self.train, self.flip_prob = source, image_dir, train, flip_prob
        self.min_size, self.max_size = min_size, max_size

    def _setup_keypoints(self, data, source, keypoint_sigmas):
        """A person-keypoints json (Mask R-CNN Sec. 5) names its J keypoints in its category's "keypoints" list:
        J, the flip permutation (left_* <-> right_* by name) and the OKS sigmas of COCOeval come from it."""
        names = {tuple(c["keypoints"]) for c in data["categories"] if c.get("keypoints")}
        self._keypoint_cat_ids = {c["id"] for c in data["categories"] if c.get("keypoints")}
        if len(names) > 1:
            raise DataError(f"{source}: categories name different keypoint lists; one list is supported")
        self.keypoint_names = list(names.pop()) if names else []
        self.num_keypoints = len(self.keypoint_names)  # 0: no keypoints, targets as before
        self.keypoint_skeleton = self._read_skeleton(data, source)  # [[j1, j2]] 0-based, for drawing (draw.py)
        self._keypoints = {}  # annotation id -> (J, 3) float32
        if not self.num_keypoints:
            if keypoint_sigmas:
                raise DataError(f"{source}: keypoint OKS sigmas given, but no category names keypoints")
            self.keypoint_sigmas, self.flip_index = None, None
            return
        partner = {n: "right_" + n[5:] if n.startswith("left_") else "left_" + n[6:] if n.startswith("right_") else n
                   for n in self.keypoint_names}
        self.flip_index = [self.keypoint_names.index(partner[n]) if partner[n] in self.keypoint_names else j
                           for j, n in enumerate(self.keypoint_names)]  # (J,) keypoint j after a flip
        if keypoint_sigmas is None and self.num_keypoints != len(COCO_KEYPOINT_SIGMAS):
            raise DataError(f"{source}: {self.num_keypoints} keypoints per object, not COCO's 17: give their OKS "
                            f"sigmas (--keypoint-sigmas)")
        sigmas = list(keypoint_sigmas or COCO_KEYPOINT_SIGMAS)
        if len(sigmas) != self.num_keypoints or not all(s > 0 for s in sigmas):
            raise DataError(f"{source}: keypoint OKS sigmas {sigmas} for {self.num_keypoints} keypoints: expected one "
                            f"positive sigma per keypoint")
        self.keypoint_sigmas = sigmas

    def _read_skeleton(self, data, source):
        """The limbs a keypoint category's "skeleton" lists as 1-based pairs [j1, j2] (COCO person: 19 of them), as
        0-based pairs; [] when no category gives one."""
        category = next((c for c in data["categories"] if c.get("keypoints") and "skeleton" in c), None)
        if category is None:
            return []
        skeleton, J = category["skeleton"], self.num_keypoints
        if not (isinstance(skeleton, list) and all(isinstance(pair, list) and len(pair) == 2 and all(
                isinstance(j, int) and not isinstance(j, bool) and 1 <= j <= J for j in pair) for pair in skeleton)):
            raise DataError(f"{source}: category id {category['id']} has skeleton {str(skeleton)[:60]}: expected "
                            f"pairs [j1, j2] of keypoint numbers 1..{J}")
        return [[j1 - 1, j2 - 1] for j1, j2 in skeleton]

    def _read_keypoints(self, ann, culprit):
        """COCO "keypoints": [x1, y1, v1, x2, ...], 3J numbers, v in {0, 1, 2} -> (J, 3) float32."""
        J = self.num_keypoints
        if ann["category_id"] not in self._keypoint_cat_ids:
            return np.zeros((J, 3), np.float32)  # an object of a class without keypoints: none labelled
        keypoints = ann.get("keypoints")
        if not is_numbers(keypoints, length=3 * J) or not set(keypoints[2::3]) <= {0, 1, 2}:
            raise DataError(f"{culprit} has bad keypoints: expected {3 * J} finite numbers x, y, v with v in 0, 1, 2")
        labelled = sum(v > 0 for v in keypoints[2::3])
        if ann.setdefault("num_keypoints", labelled) != labelled:  # COCOeval ignores a gt whose num_keypoints is 0
            raise DataError(f"{culprit} has num_keypoints {ann['num_keypoints']!r}, but {labelled} of its keypoints "
                            f"are labelled (v > 0)")
        return np.asarray(keypoints, dtype=np.float32).reshape(J, 3)

    def __len__(self):
        return len(self.image_ids)

    def _mask(self, ann):
        try:  # polygons and (un)compressed RLE -> (H0, W0) uint8, via pycocotools frPyObjects; bad RLE shows here
            return self.coco.annToMask(ann)
        except (TypeError, ValueError, IndexError, KeyError) as e:
            raise DataError(f"{self.source}: annotation id {ann['id']}: unreadable segmentation ({e!r})") from None

    def __getitem__(self, item):
        index, aug_seed = item if isinstance(item, tuple) else (item, item)
        generator = torch.Generator().manual_seed(int(aug_seed))
        image_id = self.image_ids[index]
        info = self.coco.imgs[image_id]
        path = os.path.join(self.image_dir, info["file_name"])
        image = load_image(path)  # (3, H0, W0) in [0, 1]
        h0, w0 = image.shape[-2:]
        if (h0, w0) != (info["height"], info["width"]):
            raise DataError(f"{path} is {w0}x{h0} but image id {image_id} says {info['width']}x{info['height']}")
        anns = self._anns[image_id]
        boxes = torch.tensor([ann["bbox"] for ann in anns], dtype=torch.float32).reshape(-1, 4)  # (G, 4) xywh
        boxes[:, 2:] += boxes[:, :2]  # [x, y, w, h] -> [x1, y1, x2, y2]
        boxes = torch.min(boxes.clamp(min=0), torch.tensor([w0, h0, w0, h0]))  # clipped to the image, as Detectron
        labels = torch.tensor([self._label[ann["category_id"]] for ann in anns], dtype=torch.int64)
        masks = None
        if self.has_masks:
            masks = np.stack([self._mask(ann) for ann in anns]) if anns else np.zeros((0, h0, w0), np.uint8)
            masks = torch.from_numpy(masks)  # (G, H0, W0)
        lo, hi = self.min_size if isinstance(self.min_size, (tuple, list)) else (self.min_size, self.min_size)
        flip, min_size = False, hi  # test time: no flip, min_size (the top of a range); train.py: --min-size
        if self.train:  # Rethinking Sec. 4: horizontal flip; Sec. 5.1/5.2: shorter side uniform in [lo, hi]
            flip = torch.rand((), generator=generator).item() < self.flip_prob
            min_size = int(torch.randint(lo, hi + 1, (), generator=generator))
        image, boxes, masks = transform(image, boxes, masks, min_size, self.max_size, flip)
        target = {"boxes": boxes, "labels": labels, "image_id": int(image_id), "orig_size": (h0, w0),
                  "size": tuple(image.shape[-2:])}
        if masks is not None:
            target["masks"] = masks
        if self.num_keypoints:
            keypoints = torch.from_numpy(np.stack([self._keypoints[ann["id"]] for ann in anns]) if anns else
                                         np.zeros((0, self.num_keypoints, 3), np.float32))  # (G, J, 3)
            target["keypoints"] = transform_keypoints(keypoints, (h0, w0), target["size"], flip, self.flip_index)
        return image, target


class CocoDataset(_CocoStyleDataset):
    """A COCO instances or person-keypoints json + its image folder (COCO 2017, coco_subset, or the shapes set).
    keypoint_sigmas: the OKS sigma of each keypoint for COCOeval (default COCO's 17; needed for other keypoints)."""

    def __init__(self, ann_file, image_dir, train=False, min_size=800, max_size=1333, flip_prob=0.5, subset=None,
                 subset_seed=0, keypoint_sigmas=None):
        try:
            with open(ann_file) as f:
                data = json.load(f)
        except (OSError, ValueError) as e:
            raise DataError(f"cannot read annotation file {ann_file}: {e}") from None
        except RecursionError:  # json nests deeper than Python's recursion limit
            raise DataError(f"cannot read annotation file {ann_file}: nested too deeply") from None
        self._setup(data, ann_file, image_dir, train, min_size, max_size, flip_prob, subset, subset_seed,
                    keypoint_sigmas)


class PennFudanDataset(_CocoStyleDataset):
    """Penn-Fudan pedestrians (Wang et al. 2007), native layout root/PNGImages, root/PedMasks; one class "person".

    PedMasks pixel value k > 0 is pedestrian k; its box is the tight box of its mask. Split (the project's standard):
    image names sorted; validation = every 4th image (index % 4 == 0, 43 images), training = the rest (127).
    The ground truth becomes an in-memory COCO (RLE masks, image id = sorted index + 1, annotation id =
    100 * image id + k) so COCOeval treats it exactly like COCO.
    """

    def __init__(self, root, split="train", train=False, min_size=800, max_size=1333, flip_prob=0.5, subset=None,
                 subset_seed=0):
        image_dir, mask_dir = os.path.join(root, "PNGImages"), os.path.join(root, "PedMasks")
        if not (os.path.isdir(image_dir) and os.path.isdir(mask_dir)):
            raise DataError(f"{root} is not a PennFudanPed folder (needs PNGImages/ and PedMasks/)")
        if split not in ("train", "val"):
            raise DataError(f"PennFudanPed split must be 'train' or 'val', got {split!r}")
        names = sorted(name for name in os.listdir(image_dir) if name.endswith(".png"))
        images, annotations = [], []
        for i, name in enumerate(names):
            if (i % 4 == 0) != (split == "val"):
                continue
            # (H0, W0) instance ids, 0 = background; raw values, as the masks may be mode "L" or palette "P"
            mask_path = os.path.join(mask_dir, name[:-4] + "_mask.png")
            ped = _read_image(mask_path, mode=None)
            size = _read_image(os.path.join(image_dir, name)).shape[:2]  # (H0, W0)
            if ped.shape != size:
                raise DataError(f"{mask_path}: expected one channel of instance ids of its image's size "
                                f"{size[1]}x{size[0]}, got an array of shape {ped.shape}")
            images.append({"id": i + 1, "file_name": name, "height": ped.shape[0], "width": ped.shape[1]})
            for k in np.unique(ped)[1:].tolist():
                rle = mask_utils.encode(np.asfortranarray(ped == k, dtype=np.uint8))
                annotations.append({"id": 100 * (i + 1) + k, "image_id": i + 1, "category_id": 1, "iscrowd": 0,
                                    "segmentation": {"size": rle["size"], "counts": rle["counts"].decode("ascii")},
                                    "area": float(mask_utils.area(rle)), "bbox": mask_utils.toBbox(rle).tolist()})
        data = {"images": images, "annotations": annotations, "categories": [{"id": 1, "name": "person"}]}
        source = f"{root} ({split} split)"
        self._setup(data, source, image_dir, train, min_size, max_size, flip_prob, subset, subset_seed)


VOC_CLASSES = ("aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow", "diningtable",
               "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train", "tvmonitor")

# Sec. 5.2: train on trainval2007 + train2012, evaluate on val2012.
VOC_PAPER_SPLITS = {"train": (("2007", "trainval"), ("2012", "train")), "val": (("2012", "val"),)}


def read_voc_annotation(xml_file):
    """One VOC XML -> (width, height, [(class name, [x1, y1, x2, y2] in 0-based continuous pixels, difficult 0/1)])."""
    try:
        tree = ET.parse(xml_file)
    except FileNotFoundError:
        raise DataError(f"missing annotation file {xml_file}") from None
    except (OSError, ET.ParseError) as e:
        raise DataError(f"unreadable annotation file {xml_file}: {e}") from None
    try:
        width, height = (int(tree.findtext(f"size/{key}")) for key in ("width", "height"))
        objects = []
        for obj in tree.iterfind("object"):
            name = obj.findtext("name").strip()
            if name not in VOC_CLASSES:
                raise DataError(f"{xml_file}: unknown class {name!r} (not one of the 20 VOC classes)")
            x1, y1, x2, y2 = (float(obj.findtext(f"bndbox/{key}")) for key in ("xmin", "ymin", "xmax", "ymax"))
            if not all(math.isfinite(v) for v in (x1, y1, x2, y2)):  # float() reads "nan" and "inf"
                raise DataError(f"{xml_file}: {name} bndbox {[x1, y1, x2, y2]} is not finite")
            # VOC stores 1-based inclusive pixel indices: (xmin=1, xmax=W) is the whole image, i.e. [0, W] in
            # continuous coordinates. As Detectron2 does (detectron2/data/datasets/pascal_voc.py,
            # load_voc_instances): subtract 1 from xmin and ymin, keep xmax and ymax.
            difficult = int(obj.findtext("difficult") or 0)  # a missing tag means not difficult
            objects.append((name, [x1 - 1, y1 - 1, x2, y2], difficult))
    except DataError:  # a ValueError too, but one that already names the file and the problem
        raise
    except (TypeError, ValueError, AttributeError) as e:  # a missing tag (None) or a non-number
        raise DataError(f"{xml_file}: missing or malformed size, name or bndbox ({e})") from None
    return width, height, objects


class VOCDataset(_CocoStyleDataset):
    """PASCAL VOC image sets, e.g. (("2007", "trainval"), ("2012", "train")), as one data set with boxes only.

    Rethinking Sec. 5.2: Faster R-CNN R101-FPN + GN (preset r101_fpn_gn_faster) trained on VOC2007 trainval + VOC2012
    train (the paper: about 15k images, 2.3 objects per image, 20 classes; these two image sets hold 5,011 + 5,717 =
    10,728 images) and evaluated on VOC2012 val with VOC mAP (voc.py).
    Layout: root/VOC{2007,2012}/Annotations/NAME.xml, JPEGImages/NAME.jpg, ImageSets/Main/{train,val,trainval,test}.txt.
    The ground truth becomes an in-memory COCO (as PennFudanDataset's does), so train.py and evaluate.py run on it
    unchanged: image ids 1..N in split-file order (unique across the years), categories 1..20 in VOC's order, bbox
    [x, y, w, h] in 0-based continuous pixels, iscrowd 0, no segmentation, and a "difficult" flag per object.
    Difficult objects are not training targets (_CocoStyleDataset skips them), as in py-faster-rcnn (Detectron2
    trains on them; the paper does not say); VOC mAP treats them as "ignore", while COCOeval, which evaluate.py also
    runs, knows nothing of the flag and counts them as ordinary objects.
    """

    has_masks = False

    def __init__(self, root, image_sets=VOC_PAPER_SPLITS["train"], train=False, min_size=800, max_size=1333,
                 flip_prob=0.5, subset=None, subset_seed=0):
        list_files = {(year, image_set): os.path.join(root, f"VOC{year}", "ImageSets", "Main", f"{image_set}.txt")
                      for year, image_set in image_sets}
        missing = [path for path in list_files.values() if not os.path.isfile(path)]  # before reading anything
        if missing:
            raise DataError(f"missing {missing[0]} (a VOCdevkit holds VOC<year>/ImageSets/Main/<image set>.txt)")
        images, annotations = [], []
        for (year, image_set), list_file in list_files.items():
            with open(list_file) as f:
                names = [line.split()[0] for line in f if line.strip()]
            for name in names:
                image_id = len(images) + 1
                xml_file = os.path.join(root, f"VOC{year}", "Annotations", f"{name}.xml")
                width, height, objects = read_voc_annotation(xml_file)
                images.append({"id": image_id, "file_name": os.path.join(f"VOC{year}", "JPEGImages", f"{name}.jpg"),
                               "height": height, "width": width})
                for class_name, (x1, y1, x2, y2), difficult in objects:
                    annotations.append({"id": len(annotations) + 1, "image_id": image_id,
                                        "category_id": VOC_CLASSES.index(class_name) + 1, "iscrowd": 0,
                                        "bbox": [x1, y1, x2 - x1, y2 - y1], "area": (x2 - x1) * (y2 - y1),
                                        "difficult": difficult})
        data = {"images": images, "annotations": annotations,
                "categories": [{"id": i + 1, "name": name} for i, name in enumerate(VOC_CLASSES)]}
        source = f"{root} ({' + '.join(f'VOC{year} {image_set}' for year, image_set in image_sets)})"
        self._setup(data, source, root, train, min_size, max_size, flip_prob, subset, subset_seed)

    @classmethod
    def paper_split(cls, root, split, **kwargs):
        """train.py's --data VOCdevkit: "train" = VOC2007 trainval + VOC2012 train, "val" = VOC2012 val (Sec. 5.2)."""
        if split not in VOC_PAPER_SPLITS:
            raise DataError(f"VOC split must be one of {', '.join(VOC_PAPER_SPLITS)}, got {split!r}")
        return cls(root, VOC_PAPER_SPLITS[split], **kwargs)


def collate(batch, size_divisible=32):
    """[(image (3,h,w), target)] -> (images (N,3,H,W) zero-padded bottom/right to multiples of 32, [(h, w)], [target]).
    32 = the stride of C5/P5 (FPN's largest but P6's, which max-pools P5), so that C2..C5 and P2..P5 tile the padded
    image exactly (Detectron's COARSEST_STRIDE)."""
    images, targets = zip(*batch)
    H = -(-max(image.shape[1] for image in images) // size_divisible) * size_divisible  # ceil to a multiple
    W = -(-max(image.shape[2] for image in images) // size_divisible) * size_divisible
    padded = images[0].new_zeros((len(images), 3, H, W))  # zero = the mean colour after normalization
    for i, image in enumerate(images):
        padded[i, :, : image.shape[1], : image.shape[2]] = image
    return padded, [(int(image.shape[1]), int(image.shape[2])) for image in images], list(targets)


def mix_seed(*keys):
    """A well-mixed 32-bit seed from integers (numpy SeedSequence): the same in every process and worker."""
    return int(np.random.SeedSequence(list(keys)).generate_state(1)[0])


class TrainSampler(torch.utils.data.Sampler):
    """An endless stream of (index, aug_seed) for an iteration-based loop with exact resume.

    The global stream concatenates epochs; epoch e is a permutation drawn from a generator seeded by (seed, e),
    and item i of epoch e gets aug_seed from (seed, e, i). Rank r takes global items r, r + world_size, ...
    `start` skips the first `start` items of this rank's stream: resuming at iteration k with batch b is start = k * b.
    """

    def __init__(self, size, seed=0, start=0, rank=0, world_size=1):
        super().__init__()
        assert size > 0 and 0 <= rank < world_size, f"size {size}, rank {rank}, world_size {world_size}"
        self.size, self.seed, self.start, self.rank, self.world_size = size, seed, start, rank, world_size

    def __iter__(self):
        position, epoch, order = self.start * self.world_size + self.rank, -1, None  # position in the global stream
        while True:
            e, i = divmod(position, self.size)
            if e != epoch:
                epoch, generator = e, torch.Generator().manual_seed(mix_seed(self.seed, e))
                order = torch.randperm(self.size, generator=generator)
            yield int(order[i]), mix_seed(self.seed, e, i)
            position += self.world_size


def make_train_loader(dataset, batch_size, seed=0, start_iter=0, workers=2, rank=0, world_size=1):
    """An endless iterator of collated batches; batch k is the same whatever `workers` is or where training resumed."""
    sampler = TrainSampler(len(dataset), seed, start=start_iter * batch_size, rank=rank, world_size=world_size)
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, sampler=sampler, collate_fn=collate,
                                         num_workers=workers, persistent_workers=workers > 0,
                                         generator=torch.Generator().manual_seed(seed))  # leaves the global RNG alone
    return iter(loader)


def make_eval_loader(dataset, batch_size=1, workers=2, rank=0, world_size=1, collate_fn=collate):
    """Images rank, rank + world_size, ... in order: every image evaluated exactly once (no padding duplicates)."""
    indices = list(range(rank, len(dataset), world_size))
    return torch.utils.data.DataLoader(dataset, batch_size=batch_size, sampler=indices, collate_fn=collate_fn,
                                       num_workers=workers)


def build_dataset(data, split, train, min_size=800, max_size=1333, subset=None, subset_seed=0, ann=None,
                  images=None, keypoint_sigmas=None):
    """Resolve --data: "shapes", a PennFudanPed folder, a VOCdevkit, a COCO root; explicit ann + images override
    (train.py's and evaluate.py's --<split>-ann and --<split>-images)."""
    kw = dict(train=train, min_size=min_size, max_size=max_size, subset=subset, subset_seed=subset_seed)
    if ann or images:
        if not (ann and images):
            raise DataError(f"--{split}-ann and --{split}-images must be given together (got only {ann or images})")
        return CocoDataset(ann, images, keypoint_sigmas=keypoint_sigmas, **kw)
    if data == "shapes":
        root = make_shapes(os.path.join("data_cache", "shapes"))
        ann_file = os.path.join(root, "annotations", f"instances_{split}.json")
        return CocoDataset(ann_file, os.path.join(root, split), **kw)
    if os.path.isdir(os.path.join(data, "PNGImages")):
        return PennFudanDataset(data, split, **kw)
    if any(os.path.isdir(os.path.join(data, f"VOC{year}")) for year in (2007, 2012)):
        return VOCDataset.paper_split(data, split, **kw)
    ann_pattern = os.path.join(data, "annotations", f"instances_{split}*.json")
    for ann_file in sorted(glob.glob(ann_pattern), reverse=True):  # newest year first: instances_val2017.json
        image_dir = os.path.join(data, os.path.basename(ann_file)[len("instances_"):-len(".json")])
        if os.path.isdir(image_dir):
            return CocoDataset(ann_file, image_dir, **kw)
    raise DataError(f"--data {data} is not 'shapes', a PennFudanPed folder (no {os.path.join(data, 'PNGImages')}), "
                    f"a VOCdevkit (no VOC2007/ or VOC2012/) or a COCO root (looked for {ann_pattern} with a matching "
                    f"{os.path.join(data, split)}* folder)")
