"""augment.py (related work, off by default): Random Erasing, CutMix and YOCO on hand-made images, where a box, its
mask and its pixels must still agree after the transform."""
import pytest
import torch

from augment import (MEAN, STD, RelatedWorkAugment, cutmix, cutmix_rectangle, erase, mask_boxes, photometric,
                     random_erasing, yoco)


def scene(h, w, rects, seed=0):
    """A normalized image (3, h, w) of random [0, 1] pixels and a target with one rectangular mask per
    (x1, y1, x2, y2) of rects (so each box is its mask's box), labels 1, 2, ..."""
    pixels = torch.rand((3, h, w), generator=torch.Generator().manual_seed(seed))
    masks = torch.zeros((len(rects), h, w), dtype=torch.uint8)
    for i, (x1, y1, x2, y2) in enumerate(rects):
        masks[i, y1:y2, x1:x2] = 1
    target = {"boxes": torch.tensor(rects, dtype=torch.float32).reshape(-1, 4),
              "labels": torch.arange(1, len(rects) + 1), "masks": masks, "image_id": 7, "size": (h, w)}
    return (pixels - MEAN) / STD, target


class Items(torch.utils.data.Dataset):
    """Hand-made (image, target) items, the same whatever the aug_seed."""

    def __init__(self, *items):
        self.items = items

    def __len__(self):
        return len(self.items)

    def __getitem__(self, item):
        image, target = self.items[item[0]]
        return image.clone(), {k: v.clone() if torch.is_tensor(v) else v for k, v in target.items()}


def test_mask_boxes_end_one_past_the_last_pixel():
    masks = torch.zeros((3, 10, 12), dtype=torch.uint8)
    masks[0, 2:5, 3:7] = 1
    masks[2, 9, 11] = 1
    expected = torch.tensor([[3, 2, 7, 5], [0, 0, 0, 0], [11, 9, 12, 10]], dtype=torch.float32)
    assert torch.equal(mask_boxes(masks), expected)
    assert mask_boxes(masks[:0]).shape == (0, 4)


# ------------------------------------------------------------------------------------------------ Random Erasing

def test_erase_follows_algorithm_1_inside_its_region():
    image, _ = scene(40, 60, [])
    for seed in range(20):
        erased = image.clone()
        rect = erase(erased, (10, 5, 50, 35), torch.Generator().manual_seed(seed), p=1.0)
        assert rect is not None
        x1, y1, x2, y2 = rect
        assert 10 <= x1 <= x2 <= 50 and 5 <= y1 <= y2 <= 35  # inside the region
        area = (x2 - x1) * (y2 - y1) / (40 * 30)  # S_e / S in [s_l, s_h], up to rounding H_e and W_e
        assert 0.015 <= area <= 0.45
        outside = torch.ones(40, 60, dtype=torch.bool)
        outside[y1:y2, x1:x2] = False
        assert torch.equal(erased[:, outside], image[:, outside])  # nothing else changes
        values = erased[:, y1:y2, x1:x2] * STD + MEAN  # random values in [0, 1] before normalization
        assert values.min() >= -1e-6 and values.max() <= 1 + 1e-6
    untouched = image.clone()
    assert erase(untouched, (0, 0, 60, 40), torch.Generator().manual_seed(0), p=0.0) is None
    for seed in range(20):  # a 3x3 object: a rectangle of at least one pixel, or nothing
        rect = erase(image.clone(), (20, 20, 23, 23), torch.Generator().manual_seed(seed), p=1.0)
        assert rect is None or (rect[2] > rect[0] and rect[3] > rect[1])
    assert torch.equal(untouched, image)


@pytest.mark.parametrize("mode", ["image", "object", "both"])
def test_random_erasing_never_moves_a_box_or_mask(mode):
    image, target = scene(40, 60, [(2, 2, 20, 18), (30, 10, 55, 38)])
    out, rects = random_erasing(image, target["boxes"], torch.Generator().manual_seed(3), mode, p=1.0)
    assert len(rects) == {"image": 1, "object": 2, "both": 3}[mode]
    if mode == "object":  # object-aware: each rectangle inside its object's box
        for (x1, y1, x2, y2), box in zip(rects, target["boxes"].tolist()):
            assert box[0] <= x1 <= x2 <= box[2] and box[1] <= y1 <= y2 <= box[3]
    kept = torch.ones(40, 60, dtype=torch.bool)
    for x1, y1, x2, y2 in rects:
        kept[y1:y2, x1:x2] = False
    assert torch.equal(out[:, kept], image[:, kept])
    augmented = RelatedWorkAugment(Items((image, target)), random_erasing=mode)[(0, 5)][1]
    assert all(torch.equal(augmented[k], target[k]) for k in ("boxes", "labels", "masks"))


# -------------------------------------------------------------------------------------------------------- CutMix

def test_cutmix_boxes_are_the_boxes_of_the_cut_masks():
    # This image: A untouched, B half hidden by the rectangle, C all hidden. The other: D inside the rectangle,
    # E 2/22 inside (under 30%), F 50/225 inside (under 30%).
    image, target = scene(40, 60, [(2, 2, 10, 10), (20, 10, 40, 20), (44, 24, 54, 34)], seed=0)
    other, other_target = scene(50, 70, [(35, 5, 45, 15), (10, 20, 32, 30), (55, 30, 70, 45)], seed=1)
    other_target["labels"] += 10
    rect = (30, 0, 60, 40)
    out, mixed = cutmix(image, target, other, other_target, rect)
    assert torch.equal(out[:, :, 30:], other[:, :40, 30:60]) and torch.equal(out[:, :, :30], image[:, :, :30])
    assert mixed["labels"].tolist() == [1, 2, 11]  # C (100% hidden), E and F (under 30% shown) are gone
    assert mixed["boxes"].tolist() == [[2, 2, 10, 10], [20, 10, 30, 20], [35, 5, 45, 15]]
    assert torch.equal(mixed["boxes"], mask_boxes(mixed["masks"]))  # each box is its (cut) mask's
    assert mixed["masks"].shape == (3, 40, 60) and mixed["image_id"] == 7
    # the pixels of every kept mask are the pixels of its own image there
    source = [image, image, other[:, :40, :60]]
    for mask, pixels in zip(mixed["masks"].bool(), source):
        assert torch.equal(out[:, mask], pixels[:, mask])


def test_cutmix_rectangle_area_is_one_minus_lambda_before_clipping():
    for seed in range(10):
        g = torch.Generator().manual_seed(seed)
        lam = torch.rand((), generator=torch.Generator().manual_seed(seed)).item()
        x1, y1, x2, y2 = cutmix_rectangle(400, 600, g)
        assert 0 <= x1 <= x2 <= 600 and 0 <= y1 <= y2 <= 400
        assert (x2 - x1) * (y2 - y1) <= (1 - lam) * 400 * 600 + 2 * (400 + 600)  # clipping only shrinks it


# ---------------------------------------------------------------------------------------------------------- YOCO

def test_yoco_flipped_half_maps_back_and_seam_objects_split():
    # 20 x 30, seam at x = 15. P in the left half; Q across the seam (30 + 30 pixels); S across it with 12 pixels
    # on the left (under 16: dropped) and 36 on the right.
    image, target = scene(20, 30, [(2, 2, 8, 6), (10, 8, 20, 14), (12, 15, 24, 19)])
    out, t = yoco(image, target, "width", flips=(True, False), brightness=(1.0, 1.0), contrast=(1.0, 1.0))
    torch.testing.assert_close(out[:, :, :15].flip(-1), image[:, :, :15])  # the flipped half maps back exactly
    torch.testing.assert_close(out[:, :, 15:], image[:, :, 15:])
    assert t["labels"].tolist() == [1, 2, 2, 3]
    assert t["boxes"].tolist() == [[7, 2, 13, 6], [0, 8, 5, 14], [15, 8, 20, 14], [15, 15, 24, 19]]
    assert torch.equal(t["boxes"], mask_boxes(t["masks"]))
    assert torch.equal(t["masks"][0, :, :15].flip(-1), target["masks"][0, :, :15])  # P's mask maps back too


def test_yoco_height_cut_flips_the_bottom_half_only():
    image, target = scene(20, 30, [(2, 12, 8, 18)])
    out, t = yoco(image, target, "height", flips=(False, True), brightness=(1.0, 1.0), contrast=(1.0, 1.0))
    torch.testing.assert_close(out[:, :10], image[:, :10])
    torch.testing.assert_close(out[:, 10:].flip(-1), image[:, 10:])
    assert t["boxes"].tolist() == [[22, 12, 28, 18]]
    assert torch.equal(t["masks"][:, 10:].flip(-1), target["masks"][:, 10:])


def test_photometric_is_brightness_then_contrast():
    pixels = torch.rand((3, 4, 5), generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(photometric(pixels, 1.2, 1.0), (pixels * 1.2).clamp(0, 1))
    grey = (0.299 * pixels[0] + 0.587 * pixels[1] + 0.114 * pixels[2]).mean()
    torch.testing.assert_close(photometric(pixels, 1.0, 0.5), ((pixels - grey) * 0.5 + grey).clamp(0, 1))


def test_augmented_items_depend_on_the_aug_seed_only():
    items = Items(scene(40, 60, [(2, 2, 20, 18), (30, 10, 55, 38)], seed=0),
                  scene(48, 64, [(5, 5, 40, 30)], seed=1))
    data = RelatedWorkAugment(items, random_erasing="both", cutmix=True, yoco=True)
    for seed in range(8):
        (a, ta), (b, tb) = data[(0, seed)], data[(0, seed)]
        assert torch.equal(a, b) and all(torch.equal(ta[k], tb[k]) for k in ("boxes", "labels", "masks"))
        assert torch.equal(ta["boxes"], mask_boxes(ta["masks"]))  # hand-made boxes are their masks' boxes
        assert len(ta["boxes"]) == len(ta["labels"]) == len(ta["masks"])
