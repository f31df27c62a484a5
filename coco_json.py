"""The COCO json format (cocodataset.org/#format-data), checked record by record with one-line errors.

A dataset json holds three lists:
  "images"       {id, file_name, height, width}
  "categories"   {id, name, [keypoints: J names]}
  "annotations"  {id, image_id, category_id, bbox [x, y, w, h] in pixels, segmentation (polygons [[x1, y1, ...]]
                  or RLE {counts, size [h, w]}), iscrowd 0 or 1, area, [keypoints: 3J numbers x, y, v]}
Each check raises DataError naming the file and the record (its id, or its place in the list), when the dataset is
built: a bad record met at iteration 40k, or by COCOeval at the end of a run, would cost the run (pycocotools loops
forever on an RLE whose counts do not cover its image, and decodes a short one into uninitialized memory).
"""
import math

MAX_PIXELS = 178_956_970  # an image of more pixels is refused: PIL's DecompressionBombError threshold


class DataError(ValueError):
    """Bad input data. The message is one line naming the culprit (file, annotation id, image id)."""

    def line(self):
        """That line, also when a loader worker raised the error (its text then ends the worker's traceback)."""
        return str(self).strip().splitlines()[-1].removeprefix(f"{__name__}.DataError: ")


def is_numbers(value, length=None):
    """A list of finite numbers (of `length` numbers, if given), as a json bbox, polygon or keypoint list must be;
    an integer of more digits than a float holds is not one."""
    return (isinstance(value, list) and (length is None or len(value) == length)
            and all(_is_id(v) or isinstance(v, float) and math.isfinite(v) for v in value))


def _is_id(value):
    """An integer that numpy and COCOeval hold as int64 (json allows any number of digits; bool is not a number)."""
    return isinstance(value, int) and not isinstance(value, bool) and -2 ** 63 <= value < 2 ** 63


def _short(value):
    """A json value in a message: its repr, cut to 60 characters."""
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _is_keypoint_names(value):
    return value is None or (isinstance(value, list) and all(isinstance(v, str) for v in value))


# Per list: how its records are named in messages, and each required field's test and what it should be.
_FIELDS = {
    "categories": ("category", {"id": (_is_id, "an integer"), "name": (lambda v: isinstance(v, str), "a string")}),
    "annotations": ("annotation", {"id": (_is_id, "an integer"), "image_id": (_is_id, "an integer"),
                                   "category_id": (_is_id, "an integer")}),
    "images": ("image", {"id": (_is_id, "an integer"), "file_name": (lambda v: isinstance(v, str) and v, "a name"),
                         "height": (lambda v: _is_id(v) and v > 0, "a positive integer"),
                         "width": (lambda v: _is_id(v) and v > 0, "a positive integer")}),
}


def check_records(data, source):
    """data: a parsed json. Its three lists exist, their records have the fields above, and ids are unique."""
    if not isinstance(data, dict):
        raise DataError(f"{source}: expected a json object with images, annotations, categories")
    missing = [key for key in _FIELDS if not isinstance(data.get(key), list)]
    if missing:
        raise DataError(f"{source}: no list {', '.join(missing)} (a COCO json has images, annotations, categories)")
    if not data["categories"]:
        raise DataError(f"{source}: no categories")
    for key, (kind, fields) in _FIELDS.items():
        ids = set()
        for i, record in enumerate(data[key]):
            named = isinstance(record, dict) and "id" in record and len(str(record["id"])) <= 20  # else its place
            name = f"{kind} id {record['id']}" if named else f"{key}[{i}]"
            if not isinstance(record, dict):
                raise DataError(f"{source}: {name} is not a json object")
            for field, (test, expected) in fields.items():
                if field not in record:
                    raise DataError(f"{source}: {name} has no {field}")
                if not test(record[field]):
                    raise DataError(f"{source}: {name} has {field} {_short(record[field])}, expected {expected}")
            if record["id"] in ids:  # pycocotools would keep one of them silently
                raise DataError(f"{source}: {kind} id {record['id']} appears twice in {key}")
            ids.add(record["id"])
            if key == "categories" and not _is_keypoint_names(record.get("keypoints")):
                raise DataError(f"{source}: {name} has keypoints {_short(record['keypoints'])}, expected a list of "
                                f"keypoint names")
            if key == "images" and record["height"] * record["width"] > MAX_PIXELS:
                raise DataError(f"{source}: {name} ({record['file_name']}) is {record['width']}x{record['height']}, "
                                f"more than {MAX_PIXELS} pixels (PIL's limit against decompression bombs)")


def rle_counts(counts):
    """COCO RLE counts -> the list of run lengths, or None if they are not RLE: a list of non-negative integers
    (uncompressed RLE), or a string in the compressed form of pycocotools' maskApi.c rleFrString, decoded here: 6 bits
    a character (ASCII 48..111), 5 of them value and one "more follows"; a value's last character carries its sign;
    from the fourth run on, a value is the difference to the run two before."""
    if isinstance(counts, list):
        return counts if all(_is_id(c) and c >= 0 for c in counts) else None
    if not isinstance(counts, str):
        return None
    runs, p = [], 0
    while p < len(counts):
        value, k, more = 0, 0, True
        while more:
            if p == len(counts) or not 48 <= ord(counts[p]) < 112:
                return None
            c = ord(counts[p]) - 48
            value |= (c & 0x1F) << 5 * k
            more = bool(c & 0x20)
            p, k = p + 1, k + 1
            if not more and c & 0x10:
                value |= -1 << 5 * k  # negative: sign-extend
        runs.append(value + (runs[-2] if len(runs) > 2 else 0))
        if runs[-1] < 0:
            return None
    return runs


def _segmentation_problem(segm, image):
    """Why segm is not COCO polygons [[x1, y1, x2, y2, x3, y3, ...], ...] (an even count >= 6 of numbers each) or an
    RLE {counts, size} of the image's [height, width] whose runs cover its height x width pixels; None if it is."""
    h, w = image["height"], image["width"]
    if isinstance(segm, dict):
        if not {"counts", "size"} <= segm.keys() or segm["size"] != [h, w]:
            return f"an RLE needs counts and size [height, width] = [{h}, {w}]"
        runs = rle_counts(segm["counts"])
        if runs is None:
            return "its RLE counts are neither a list of non-negative integers nor a compressed RLE string"
        if sum(runs) != h * w:
            return f"its RLE counts cover {sum(runs)} pixels, not height x width = {h * w}"
        return None
    if not (isinstance(segm, list) and len(segm) > 0
            and all(is_numbers(p) and len(p) >= 6 and len(p) % 2 == 0 for p in segm)):
        return (f"expected polygons [[x1, y1, x2, y2, x3, y3, ...], ...] (an even count >= 6 of numbers each) or RLE "
                f"{{counts, size}} of size [height, width] = [{h}, {w}]")
    # pycocotools rasterizes in int32 steps: coordinates near 1e8 crash it, near 1e9 give an empty mask. Ten image
    # sizes around the image leave room for objects outside it (dropped as targets) and stay far from that.
    far = [v for p in segm for v, side in zip(p, [w, h] * (len(p) // 2)) if not -10 * side <= v <= 11 * side]
    if far:
        return f"a polygon coordinate {_short(far[0])} lies far outside the {w}x{h} image (beyond 10 image sizes)"
    return None


def check_annotation(ann, image, culprit, needs_segmentation):
    """One annotation of `image` (its record): bbox, segmentation, iscrowd and area. COCOeval needs the last two, so
    a json without them (common for exported custom sets) gets COCO's meaning: iscrowd 0 and, as area, the box's."""
    if not is_numbers(ann.get("bbox"), length=4):
        raise DataError(f"{culprit} has bbox {_short(ann.get('bbox'))}, not [x, y, w, h] (4 finite numbers)")
    problem = needs_segmentation and _segmentation_problem(ann.get("segmentation"), image)
    if problem:
        raise DataError(f"{culprit} has a bad segmentation: {problem}")
    ann.setdefault("iscrowd", 0)
    ann.setdefault("area", ann["bbox"][2] * ann["bbox"][3])
    if ann["iscrowd"] not in (0, 1) or isinstance(ann["iscrowd"], bool):
        raise DataError(f"{culprit} has iscrowd {_short(ann['iscrowd'])}, expected 0 or 1")
    if not is_numbers([ann["area"]]) or ann["area"] < 0:  # a negative area turns every COCOeval AP into -1
        raise DataError(f"{culprit} has area {_short(ann['area'])}, expected a number >= 0")
