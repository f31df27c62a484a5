"""The COCO json format (cocodataset.org/#format-data), checked record by record with one-line errors.

A dataset json holds three lists:
  "images"       {id, file_name, height, width}
  "categories"   {id, name, [keypoints: J names]}
  "annotations"  {id, image_id, category_id, bbox [x, y, w, h] in pixels, segmentation (polygons [[x1, y1, ...]]
                  or RLE {counts, size [h, w]}), iscrowd 0 or 1, area, [keypoints: 3J numbers x, y, v]}
Each check raises DataError naming the file and the record (its id, or its place in the list), when the dataset is
built: a bad record met at iteration 40k, or by COCOeval at the end of a run, would cost the run.
"""
import math


class DataError(ValueError):
    """Bad input data. The message is one line naming the culprit (file, annotation id, image id)."""

    def line(self):
        """That line, also when a loader worker raised the error (its text then ends the worker's traceback)."""
        return str(self).strip().splitlines()[-1].removeprefix(f"{__name__}.DataError: ")


def is_numbers(value, length=None):
    """A list of finite numbers (of `length` numbers, if given), as a json bbox, polygon or keypoint list must be."""
    return (isinstance(value, list) and (length is None or len(value) == length)
            and all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in value))


def _is_id(value):
    return isinstance(value, int) and not isinstance(value, bool)


# Per list: how its records are named in messages, and each required field's test and what it should be.
_FIELDS = {
    "categories": ("category", {"id": (_is_id, "an integer"), "name": (lambda v: isinstance(v, str), "a string")}),
    "annotations": ("annotation", {"id": (_is_id, "an integer")}),
    "images": ("image", {"id": (_is_id, "an integer"), "file_name": (lambda v: isinstance(v, str), "a string"),
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
            name = f"{kind} id {record['id']}" if isinstance(record, dict) and "id" in record else f"{key}[{i}]"
            if not isinstance(record, dict):
                raise DataError(f"{source}: {name} is not a json object")
            for field, (test, expected) in fields.items():
                if field not in record:
                    raise DataError(f"{source}: {name} has no {field}")
                if not test(record[field]):
                    raise DataError(f"{source}: {name} has {field} {record[field]!r}, expected {expected}")
            if record["id"] in ids:  # pycocotools would keep one of them silently
                raise DataError(f"{source}: {kind} id {record['id']} appears twice in {key}")
            ids.add(record["id"])


def _is_segmentation(segm, image):
    """COCO polygons [[x1, y1, x2, y2, x3, y3, ...], ...] (an even count >= 6 of numbers each) or RLE {counts, size}
    of the image's [height, width]. RLE counts are checked only when decoded (pycocotools does it then)."""
    if isinstance(segm, dict):
        return {"counts", "size"} <= segm.keys() and segm["size"] == [image["height"], image["width"]]
    return (isinstance(segm, list) and len(segm) > 0
            and all(is_numbers(p) and len(p) >= 6 and len(p) % 2 == 0 for p in segm))


def check_annotation(ann, image, culprit, needs_segmentation):
    """One annotation of `image` (its record): bbox, segmentation, iscrowd and area. COCOeval needs the last two, so
    a json without them (common for exported custom sets) gets COCO's meaning: iscrowd 0 and, as area, the box's."""
    if not is_numbers(ann.get("bbox"), length=4):
        raise DataError(f"{culprit} has bbox {ann.get('bbox')!r}, not [x, y, w, h] (4 finite numbers)")
    if needs_segmentation and not _is_segmentation(ann.get("segmentation"), image):
        raise DataError(f"{culprit} has a bad segmentation: expected polygons [[x1, y1, x2, y2, x3, y3, ...], ...] "
                        f"(an even count >= 6 of numbers each) or RLE {{counts, size}} of size [height, width] = "
                        f"[{image['height']}, {image['width']}]")
    ann.setdefault("iscrowd", 0)
    ann.setdefault("area", ann["bbox"][2] * ann["bbox"][3])
    if ann["iscrowd"] not in (0, 1) or isinstance(ann["iscrowd"], bool) or not is_numbers([ann["area"]]):
        raise DataError(f"{culprit} has iscrowd {ann['iscrowd']!r} and area {ann['area']!r}: expected 0 or 1, and "
                        f"a number")
