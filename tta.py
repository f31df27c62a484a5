"""Test-time augmentation: the detector at several scales and mirrored, the detections merged, the masks averaged.

Rethinking ImageNet Pre-training (arXiv:1811.08883) Sec. 5.1, Fig. 5 ("w/ test aug": mask AP 41.6 from scratch vs
40.9 pre-trained for R50) and Table 3 ("+ test aug": 48.6 -> 50.9 box AP for the X152 cascade) use "multi-scale
test as implemented in Detectron". The paper lists no scales. As in Detectron, the test scale (--min-size, capped at
--max-size: 800, 1333) is always one view and --tta-scales adds views capped at --tta-max-size; Detectron's example
adds 400..1200 in steps of 100 but 800, each also mirrored, with a cap of 2000:
`evaluate.py --tta-scales 400,500,600,700,900,1000,1100,1200 --tta-flip`.

The merging follows Detectron2's GeneralizedRCNNWithTTA:
  1. run the detector on every augmentation (a scale, mirrored or not) and map its boxes back to the original image;
  2. merge the union of all boxes by NMS per class at the RoI heads' IoU threshold and keep the top
     detections_per_img, as the RoI heads do for one view (Mask R-CNN Sec. 3.1 "Inference");
  3. run the mask branch on the merged boxes in every augmentation, mirror the masks of mirrored views back, average
     the M x M probabilities and paste the average into the original image (Detectron's "soft average" of masks).
Departure from Detectron, the paper's code: Detectron merged the class scores of all RoIs of all augmentations
before NMS; Detectron2, and this file, merge each augmentation's final detections. As in Detectron2, the backbone
runs twice per augmentation (for the boxes, then for the masks of the merged boxes) rather than keeping every
view's feature maps in memory.

Shapes: A augmentations (scales x flips), (H0, W0) original image, (h, w) one scale's image before padding,
D detections, M mask side (28).
"""
import copy

import torch
from tqdm import tqdm

import data
import distributed
import fast_ops
import flags
from boxes import batched_nms
from masks import paste_masks


def flip_boxes(boxes, width):
    """Mirror (D, 4) boxes (x1, y1, x2, y2) in an image `width` pixels wide: x -> width - x, so x1' = width - x2.
    Its own inverse; data.transform mirrors ground-truth boxes the same way."""
    return torch.stack([width - boxes[:, 2], boxes[:, 1], width - boxes[:, 0], boxes[:, 3]], dim=1)


def merge_detections(boxes, scores, labels, nms_thresh=0.5, detections_per_img=100, plain_ops=False):
    """The union of all augmentations' detections, boxes (D, 4) in original pixels, scores (D,), labels (D,) ->
    the boxes that survive NMS within their class, at most detections_per_img, by decreasing score.
    plain_ops: boxes.batched_nms instead of fast_ops.batched_nms (the model's plain_ops)."""
    nms = batched_nms if plain_ops else fast_ops.batched_nms
    keep = nms(boxes, scores, labels, nms_thresh)[:detections_per_img]
    return boxes[keep], scores[keep], labels[keep]


def average_masks(mask_probs, flipped):
    """[(D, 1, M, M)] probabilities of the same D boxes, one per augmentation, and whether that view was mirrored ->
    their mean (D, 1, M, M), each mirrored view's masks mirrored back first (an M x M mask spans its box, so a
    mirrored box's mask is the mirror image of the mask; no rescaling is needed across scales)."""
    return torch.stack([p.flip(-1) if f else p for p, f in zip(mask_probs, flipped)]).float().mean(dim=0)


@torch.no_grad()
def detect(model, views, original_size, flip=True):
    """Test-time augmented inference on one image.

    model: a MaskRCNN in eval mode; what TTA uses of it is detect_boxes, mask_probs, plain_ops and its RoI heads'
    mask_head, keypoint_head, nms_thresh and detections_per_img. views [(3, h, w)]: the image normalized and
    resized to each test scale (data.transform), not padded, on the model's device; original_size (H0, W0). flip
    adds every view's mirror image.
    Returns what model(...) returns for one image in original pixels: {"boxes" (D, 4), "labels" (D,),
    "scores" (D,), "masks" (D, 1, H0, W0)}, without "masks" when the model has no mask head.
    """
    heads = model.roi_heads
    if heads.keypoint_head is not None:
        raise ValueError("test-time augmentation merges boxes and masks; evaluate keypoint models without it")
    H0, W0 = original_size
    mirrored = (False, True) if flip else (False,)
    # One batch per scale: the view and, with flip, its mirror image (mirrored after resizing, as data.transform does).
    batches = [data.collate([(view.flip(-1) if m else view, None) for m in mirrored])[:2] for view in views]

    # 1. Detections of every augmentation, in original pixels (the model rescales them to original_sizes).
    found = []
    for images, sizes in batches:
        outputs = model.detect_boxes(images, sizes, original_sizes=[original_size] * len(sizes))
        for m, out in zip(mirrored, outputs):
            boxes = flip_boxes(out["boxes"], W0) if m else out["boxes"]  # a mirrored view's boxes, mirrored back
            found.append((boxes, out["scores"], out["labels"]))
    boxes, scores, labels = (torch.cat(column) for column in zip(*found))  # (sum of D_a, 4), (sum of D_a,) twice

    # 2. One set of detections, with the NMS settings of the RoI heads.
    boxes, scores, labels = merge_detections(boxes, scores, labels, heads.nms_thresh, heads.detections_per_img,
                                             model.plain_ops)
    result = {"boxes": boxes, "labels": labels, "scores": scores}
    if heads.mask_head is None:
        return result

    # 3. The merged boxes' masks in every augmentation, averaged, then pasted once.
    probs = []
    for images, sizes in batches:
        h, w = sizes[0]
        in_view = boxes * boxes.new_tensor([w / W0, h / H0, w / W0, h / H0])  # original pixels -> this scale's
        view_boxes = [flip_boxes(in_view, w) if m else in_view for m in mirrored]
        probs += model.mask_probs(images, sizes, view_boxes, [labels] * len(sizes))  # [(D, 1, M, M)] per view
    paste = paste_masks if model.plain_ops else fast_ops.paste_masks
    result["masks"] = paste(average_masks(probs, mirrored * len(views)), boxes, original_size)  # (D, 1, H0, W0)
    return result


class ScaledViews(torch.utils.data.Dataset):
    """A test dataset seen at several scales: item i is [(image (3, h, w), target)], one pair per view.

    The first view is the dataset itself (its min_size and max_size: Detectron's TEST.SCALE and TEST.MAX_SIZE); each
    added scale is a shallow copy of it (sharing its annotations) with that shorter side and the longer side capped at
    max_size (Detectron's TEST.BBOX_AUG.MAX_SIZE). Every view reads and decodes the image and its annotations again:
    simple, and small next to the model's time.
    """

    def __init__(self, dataset, scales, max_size=2000):
        self.views = [dataset]
        for scale in scales:
            view = copy.copy(dataset)
            view.min_size, view.max_size = scale, max_size
            self.views.append(view)

    def __len__(self):
        return len(self.views[0])

    def __getitem__(self, index):
        return [view[index] for view in self.views]


def _single(batch):
    return batch[0]  # the loader's batch size is 1; a module-level function, so worker processes can use it


@torch.no_grad()
def predict(model, dataset, device, scales=(), flip=True, amp="none", workers=2, max_size=2000):
    """Test-time augmented inference over this process's shard of the dataset (all of it in one process): yields
    (output, target) per image, in dataset order. The views: the dataset's own scale, and each of `scales` (shorter
    sides) with the longer side capped at max_size; with flip, each view's mirror image too."""
    model.eval()
    amp_dtype = flags.amp_dtype(amp)
    loader = data.make_eval_loader(ScaledViews(dataset, scales, max_size), 1, workers, rank=distributed.get_rank(),
                                   world_size=distributed.get_world_size(), collate_fn=_single)
    for item in tqdm(loader, desc=f"eval, {1 + len(scales)} scales{' x 2 flips' if flip else ''}", leave=False,
                     dynamic_ncols=True):
        target = item[0][1]
        with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
            out = detect(model, [image.to(device) for image, _ in item], tuple(target["orig_size"]), flip)
        yield out, target
