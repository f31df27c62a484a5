"""Related work on the data side: training augmentations that are not the paper's recipe, off by default.

Rethinking ImageNet Pre-training (arXiv:1811.08883) Sec. 4 trains with horizontal flip only (data.py). These three,
each from another paper, can be added for a comparison (train.py's group "related work"):
- Random Erasing (Zhong et al. 2017, arXiv:1708.04896): Sec. 3, Alg. 1, erases a random rectangle with random
  values; Sec. 3.3 for object detection: in the whole image (image-aware), inside each object's box
  (object-aware), or both. Boxes and masks are unchanged.
- CutMix (Yun et al. 2019, arXiv:1905.04899, Sec. 3.1), for detection: a rectangle of another training image is
  pasted in, with the instances it shows. Departures from the classification version: no label mixing (each
  instance keeps its own label) and lambda only sets the rectangle's area; instances change as `cutmix` says.
- YOCO, "You Only Cut Once" (Han et al. 2022, arXiv:2201.12078, Sec. 3): the image is cut into two halves, each
  augmented on its own (here: horizontal flip, brightness and contrast), and put back together.

RelatedWorkAugment applies them to a training set's items. Its randomness comes from a generator seeded from the
item's aug_seed (data.py), mixed with a constant so that data.py's own draws (flip, scale) stay as they are: an item
is the same whatever the worker, the process or the iteration training resumed at.

Shapes: as data.py's: image (3, h, w) normalized (IMAGE_MEAN, IMAGE_STD); a target's "boxes" (G, 4) x1, y1, x2, y2
in pixels (a mask's box ends one past its last column and row), "labels" (G,), "masks" (G, h, w) uint8.
"""
import math

import torch

from data import IMAGE_MEAN, IMAGE_STD, mix_seed

STREAM = 20  # mixed into aug_seed: this module's generator differs from data.py's for the same item
MEAN, STD = torch.tensor(IMAGE_MEAN)[:, None, None], torch.tensor(IMAGE_STD)[:, None, None]  # (3, 1, 1)


def mask_boxes(masks):
    """masks (G, h, w) -> (G, 4) float32 tight boxes: x1 the first column with a pixel, x2 one past the last (y
    alike), as data.py's boxes of masks; an empty mask's box is (0, 0, 0, 0)."""
    def span(hit):  # (G, n) bool -> first index with a pixel, one past the last one
        n = hit.shape[1]
        return hit.int().argmax(1), n - hit.flip(1).int().argmax(1)
    masks = masks.bool()
    (x1, x2), (y1, y2) = span(masks.any(1)), span(masks.any(2))  # columns (G, w), rows (G, h)
    boxes = torch.stack([x1, y1, x2, y2], dim=1).float()  # (G, 4)
    return boxes * masks.flatten(1).any(1)[:, None]


def _uniform(low, high, generator):
    return low + (high - low) * torch.rand((), generator=generator).item()


# ------------------------------------------------------------------------------------------------ Random Erasing

def erase(image, region, generator, p=0.5, s_l=0.02, s_h=0.4, r_1=0.3, attempts=100):
    """Random Erasing, Alg. 1 of Zhong et al., in region (x0, y0, x1, y1) (integer pixels) of image (3, h, w),
    changed in place. Returns the erased rectangle (x, y, x + W_e, y + H_e), or None.
    The paper's defaults (Sec. 4.1): p = 0.5, s_l = 0.02, s_h = 0.4, r_1 = 0.3 (r_2 = 1 / r_1). Alg. 1 draws again
    until the rectangle fits; here at most `attempts` times."""
    x0, y0, x1, y1 = region
    W, H = x1 - x0, y1 - y0
    if torch.rand((), generator=generator).item() >= p:  # Alg. 1: p_1 <- Rand(0, 1); if p_1 >= p, I unchanged
        return None
    for _ in range(attempts):
        S_e = _uniform(s_l, s_h, generator) * W * H  # Alg. 1: S_e <- Rand(s_l, s_h) x S
        r_e = _uniform(r_1, 1 / r_1, generator)  # Alg. 1: r_e <- Rand(r_1, r_2)
        H_e, W_e = round(math.sqrt(S_e * r_e)), round(math.sqrt(S_e / r_e))  # Alg. 1: H_e, W_e
        x_e = int(torch.randint(W + 1, (), generator=generator))  # Alg. 1: x_e <- Rand(0, W)
        y_e = int(torch.randint(H + 1, (), generator=generator))  # Alg. 1: y_e <- Rand(0, H)
        if 0 < W_e and x_e + W_e <= W and 0 < H_e and y_e + H_e <= H:  # a rectangle of at least one pixel
            x, y = x0 + x_e, y0 + y_e
            # Sec. 3: "each pixel in I_e is assigned to a random value in [0, 255]": [0, 1] here, then normalized
            values = torch.rand((3, H_e, W_e), generator=generator)
            image[:, y:y + H_e, x:x + W_e] = (values - MEAN) / STD
            return x, y, x + W_e, y + H_e
    return None


def random_erasing(image, boxes, generator, mode="both", p=0.5, s_l=0.02, s_h=0.4, r_1=0.3):
    """Random Erasing for object detection (Zhong et al. Sec. 3.3): mode "image" erases in the whole image
    (image-aware, IRE), "object" inside each object's box (object-aware, ORE), "both" does the two (I+ORE), the
    image first. image (3, h, w) normalized, boxes (G, 4) -> (a changed copy of image, [erased rectangles]).
    The boxes (and masks) stay as they are: erasing moves nothing."""
    image, h, w = image.clone(), image.shape[1], image.shape[2]
    regions = [(0, 0, w, h)] if mode in ("image", "both") else []
    if mode in ("object", "both"):  # each box, widened to whole pixels and clipped to the image
        regions += [(max(0, math.floor(x1)), max(0, math.floor(y1)), min(w, math.ceil(x2)), min(h, math.ceil(y2)))
                    for x1, y1, x2, y2 in boxes.tolist()]
    erased = [erase(image, region, generator, p, s_l, s_h, r_1) for region in regions]
    return image, [rect for rect in erased if rect is not None]


# -------------------------------------------------------------------------------------------------------- CutMix

def cutmix_rectangle(h, w, generator):
    """CutMix Sec. 3.1: lambda ~ Beta(1, 1) = U(0, 1) (alpha = 1, the paper's ImageNet setting); a rectangle of
    r_w = W sqrt(1 - lambda), r_h = H sqrt(1 - lambda) centred at r_x ~ U(0, W), r_y ~ U(0, H), clipped to the
    (h, w) image, in integer pixels (x1, y1, x2, y2). Here lambda only sets the rectangle (no label mixing)."""
    lam = torch.rand((), generator=generator).item()
    r_w, r_h = w * math.sqrt(1 - lam), h * math.sqrt(1 - lam)  # Sec. 3.1: r_w r_h / (W H) = 1 - lambda
    r_x, r_y = _uniform(0, w, generator), _uniform(0, h, generator)
    x1, x2 = (min(w, max(0, round(r_x + s * r_w / 2))) for s in (-1, 1))
    y1, y2 = (min(h, max(0, round(r_y + s * r_h / 2))) for s in (-1, 1))
    return x1, y1, x2, y2


def cutmix(image, target, other_image, other_target, rectangle, max_hidden=0.7, min_area=16):
    """Paste the rectangle (x1, y1, x2, y2) of other_image (3, h', w') into image (3, h, w) at the same place; the
    rectangle lies in both images. Instances (Detectron's rule: a box is its visible mask's box):
    - this image's: one the rectangle does not touch keeps its box; one it touches keeps its visible mask and that
      mask's box if at most max_hidden (70%) of its mask is hidden and min_area (16) pixels or more stay visible;
      else it is dropped;
    - the other image's: the part of its mask inside the rectangle, and that part's box, if at least
      1 - max_hidden of its mask and min_area pixels are inside; else it is left out.
    Returns (image, target) with the instances of the image first; other keys of target are kept."""
    x1, y1, x2, y2 = rectangle
    h, w = image.shape[1:]
    inside = torch.zeros((h, w), dtype=torch.bool)
    inside[y1:y2, x1:x2] = True
    image = image.clone()
    image[:, y1:y2, x1:x2] = other_image[:, y1:y2, x1:x2]

    masks = target["masks"].bool()  # (G, h, w)
    area = masks.flatten(1).sum(1)  # (G,)
    hidden = (masks & inside).flatten(1).sum(1)  # (G,)
    visible = masks & ~inside
    touched = hidden > 0
    keep = ~touched | ((hidden <= max_hidden * area) & (area - hidden >= min_area))
    boxes = torch.where(touched[:, None], mask_boxes(visible), target["boxes"])

    pasted = torch.zeros((len(other_target["masks"]), h, w), dtype=torch.bool)  # (G', h, w)
    pasted[:, y1:y2, x1:x2] = other_target["masks"][:, y1:y2, x1:x2].bool()
    shown = pasted.flatten(1).sum(1)  # (G',)
    keep_other = (shown >= (1 - max_hidden) * other_target["masks"].flatten(1).sum(1)) & (shown >= min_area)

    target = dict(target)
    target["boxes"] = torch.cat([boxes[keep], mask_boxes(pasted[keep_other])])
    target["labels"] = torch.cat([target["labels"][keep], other_target["labels"][keep_other]])
    target["masks"] = torch.cat([visible[keep], pasted[keep_other]]).to(torch.uint8)
    return image, target


# ---------------------------------------------------------------------------------------------------------- YOCO

def yoco_draws(generator, brightness=0.4, contrast=0.4):
    """YOCO's random choices: the cut ("width": left and right halves, or "height": top and bottom, each with
    probability 1/2, YOCO Sec. 3), then per half a horizontal flip (probability 1/2), a brightness and a contrast
    factor uniform in [1 - 0.4, 1 + 0.4] (torchvision's ColorJitter(0.4, 0.4); our choice of photometric changes).
    Returns (cut, flips (2,), brightness factors (2,), contrast factors (2,))."""
    cut = "width" if torch.rand((), generator=generator).item() < 0.5 else "height"
    flips, bright, contr = [], [], []
    for _ in range(2):
        flips.append(torch.rand((), generator=generator).item() < 0.5)
        bright.append(_uniform(1 - brightness, 1 + brightness, generator))
        contr.append(_uniform(1 - contrast, 1 + contrast, generator))
    return cut, flips, bright, contr


def photometric(pixels, brightness, contrast):
    """pixels (3, h, w) in [0, 1] -> brightness x pixels, then contrast about the mean grey level (ITU-R 601
    luma), clipped to [0, 1] after each: torchvision's adjust_brightness and adjust_contrast."""
    pixels = (pixels * brightness).clamp(0, 1)
    grey = (0.299 * pixels[0] + 0.587 * pixels[1] + 0.114 * pixels[2]).mean()
    return ((pixels - grey) * contrast + grey).clamp(0, 1)


def yoco(image, target, cut, flips, brightness, contrast, min_area=16):
    """YOCO (Han et al. Sec. 3): cut image (3, h, w) into two halves along cut ("width": at x = w // 2, "height": at
    y = h // 2), augment each half on its own (flips[i]: a horizontal flip within the half; photometric with
    brightness[i], contrast[i]), put them back. Instances follow their half:
    - one whose box lies in one half keeps it (mirrored within the half if that half flips);
    - one cut by the seam is split into two instances, one per half, each with its part of the mask and that part's
      box; a part under min_area (16) pixels is dropped.
    Returns (image, target); other keys of target are kept."""
    h, w = image.shape[1:]
    halves = ([(0, 0, w // 2, h), (w // 2, 0, w, h)] if cut == "width" else [(0, 0, w, h // 2), (0, h // 2, w, h)])
    out = image.clone()
    masks, boxes = target["masks"].bool(), target["boxes"]
    bx1, by1, bx2, by2 = boxes.unbind(1)
    new_boxes, new_labels, new_masks = [], [], []
    for (x0, y0, x1, y1), flip, b, c in zip(halves, flips, brightness, contrast):
        piece = photometric(image[:, y0:y1, x0:x1] * STD + MEAN, b, c)  # un-normalized to [0, 1] and back
        part = torch.zeros_like(masks)
        part[:, y0:y1, x0:x1] = masks[:, y0:y1, x0:x1]
        geometric = boxes.clone()
        if flip:  # within the half: x -> x0 + x1 - x
            piece = piece.flip(-1)
            part[:, y0:y1, x0:x1] = part[:, y0:y1, x0:x1].flip(-1)
            geometric[:, 0], geometric[:, 2] = x0 + x1 - bx2, x0 + x1 - bx1
        out[:, y0:y1, x0:x1] = (piece - MEAN) / STD
        within = (bx1 >= x0) & (bx2 <= x1) & (by1 >= y0) & (by2 <= y1)  # (G,) the box lies in this half
        overlaps = (bx1 < x1) & (bx2 > x0) & (by1 < y1) & (by2 > y0)  # (G,) some of the box is in this half
        keep = within | (overlaps & (part.flatten(1).sum(1) >= min_area))  # cut by the seam: a part big enough
        new_boxes.append(torch.where(within[:, None], geometric, mask_boxes(part))[keep])
        new_labels.append(target["labels"][keep])
        new_masks.append(part[keep])
    target = dict(target, boxes=torch.cat(new_boxes), labels=torch.cat(new_labels),
                  masks=torch.cat(new_masks).to(torch.uint8))
    return out, target


# ------------------------------------------------------------------------------------------------- the training set

class RelatedWorkAugment(torch.utils.data.Dataset):
    """A training set (data.py, items (index, aug_seed)) with the related-work augmentations, in this order:
    cutmix (the other image: an index and an aug_seed drawn from this item's generator, read through the dataset as
    any item), yoco, random_erasing ("image", "object", "both" or None). Needs masks (cutmix and yoco recompute
    boxes from them) and no keypoints for cutmix and yoco: train.py refuses other data."""

    def __init__(self, dataset, random_erasing=None, cutmix=False, yoco=False):
        self.dataset, self.random_erasing, self.cutmix, self.yoco = dataset, random_erasing, cutmix, yoco

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, item):
        _, aug_seed = item
        image, target = self.dataset[item]
        generator = torch.Generator().manual_seed(mix_seed(aug_seed, STREAM))
        if self.cutmix:
            other = int(torch.randint(len(self.dataset), (), generator=generator))
            other_seed = int(torch.randint(2 ** 31, (), generator=generator))
            other_image, other_target = self.dataset[(other, other_seed)]
            h, w = (min(a, b) for a, b in zip(image.shape[1:], other_image.shape[1:]))  # both images hold it
            image, target = cutmix(image, target, other_image, other_target, cutmix_rectangle(h, w, generator))
        if self.yoco:
            image, target = yoco(image, target, *yoco_draws(generator))
        if self.random_erasing:
            image, _ = random_erasing(image, target["boxes"], generator, self.random_erasing)
        return image, target
