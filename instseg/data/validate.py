"""One pass over a COCO-format annotation file before any work, so bad data stops with one line
naming the file and the image or annotation, instead of a traceback hours into training (or AP 0).

What mmdet would crash on, or silently get wrong, is an error. What it drops by itself (boxes under
1 px, zero area or outside the image; crowd instances, which it marks as ignored) or what adds
nothing (a polygon without area next to valid ones) is counted in one summary line.

Image files: every file's existence is checked from one directory listing per folder (cheap even for
COCO's 118k images); only an evenly spread sample of ``decode_sample`` files is decoded, with
OpenCV and the flags mmdet's LoadImageFromFile uses, and its size compared with the file's
height/width. Decoding every file (or even reading its header) costs one disk read per image on
every run, minutes for COCO on cold or network storage; a sample still catches what goes wrong for
whole sets at once: a wrong folder, resized copies, a format OpenCV cannot read.
"""
from __future__ import annotations

import math
import os
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from instseg.data.coco import category_names, check_classes, load_annotation_file
from instseg.errors import ConfigError

DECODE_SAMPLE = 32
# A polygon enclosing less than this (px^2; float noise on collinear points) rasterizes to no pixel.
DEGENERATE_AREA = 1e-6
_NUMBER = (int, float)


@dataclass
class Summary:
    """Counts of what mmdet skips or leaves without a target, for one split's annotation file."""
    split_name: str
    path: Path
    training: bool
    images: int = 0
    annotations: int = 0
    empty_boxes: int = 0           # mmdet drops them: w or h < 1 px, area <= 0, or outside the image
    degenerate_polygons: int = 0   # polygons without area: they add no pixel to a mask
    unannotated_images: int = 0    # training: no annotation of the classes; mmdet leaves them out
    crowd_only_images: int = 0     # training: only crowd (ignored) instances; trained as background
    background_images: int = 0     # training: only dropped boxes; trained as background

    def line(self) -> str | None:
        """The one summary line, or None when there is nothing to say."""
        where = f'{self.split_name} ({self.path}): '
        dropped = ', '.join(text for n, text in (
            (self.empty_boxes, _count(self.empty_boxes, 'empty box', 'empty boxes')
             + ' (w or h < 1 px, area 0, or outside the image)'),
            (self.degenerate_polygons, _count(self.degenerate_polygons, 'degenerate polygon') + ' (no area)')) if n)
        if not self.training:
            return f"{where}{dropped}: kept in the ground truth COCO's evaluation scores" if dropped else None
        parts = [f'skipped {dropped}'] if dropped else []
        if self.unannotated_images:
            parts.append(f'left out {_count(self.unannotated_images, "image")} without annotations')
        background = ' and '.join(text for n, text in (
            (self.crowd_only_images, _count(self.crowd_only_images, 'crowd-only image')),
            (self.background_images, _count(self.background_images, 'image') + ' with only empty boxes')) if n)
        if background:
            verb = 'trains' if self.crowd_only_images + self.background_images == 1 else 'train'
            parts.append(f'{background} {verb} as background (no instance to learn)')
        return where + '; '.join(parts) if parts else None


def _count(n: int, singular: str, plural: str | None = None) -> str:
    return f'{n} {singular if n == 1 else plural or singular + "s"}'


class _Problems:
    """Collects problems; the error names the first and how many more there are."""

    def __init__(self, where: str):
        self.where, self.first, self.count = where, None, 0

    def add(self, message: str) -> None:
        self.count += 1
        if self.first is None:
            self.first = message

    def raise_any(self) -> None:
        if self.count:
            more = f' (and {_count(self.count - 1, "more problem")} in this file)' if self.count > 1 else ''
            raise ConfigError(f'{self.where}: {self.first}{more}')


def validate_coco(path, image_dir, split_name: str, *, classes=None, training: bool = False,
                  decode_sample: int = DECODE_SAMPLE) -> Summary:
    """Checks ``path`` (annotations) and ``image_dir`` (its images) for the split ``split_name``
    (e.g. ``data.train``, used in messages). ``classes``: the names trained on (default: all);
    ``training``: also check that there is something to train on. Raises ConfigError."""
    path, image_dir = Path(path), Path(image_dir)
    try:
        content = load_annotation_file(path)
        names = category_names(path)  # checks the category list
    except ConfigError as e:
        raise ConfigError(f'{split_name}.ann: {e}') from None
    where = f'{split_name} ({path})'
    if 'annotations' not in content:
        raise ConfigError(f'{where}: no annotations (an image-info file without them serves only '
                          'tools/test.py format_only=true)')
    for key in ('images', 'annotations'):
        if not isinstance(content[key], list):
            raise ConfigError(f'{where}: {key} must be a list, not a {type(content[key]).__name__}')
    if not content['images']:
        raise ConfigError(f'{where}: no images')
    if not image_dir.is_dir():
        raise ConfigError(f'{split_name}.img: image directory not found: {image_dir}')
    problems = _Problems(where)
    images = _check_images(content['images'], problems)
    summary = Summary(split_name, path, training, images=len(images), annotations=len(content['annotations']))
    category_ids = [c['id'] for c in content['categories']]
    selected = set(category_ids) if classes is None else \
        {i for i, name in zip(category_ids, names) if name in set(classes)}
    annotated, usable, crowd = _check_annotations(content['annotations'], images, set(category_ids),
                                                  selected, training, summary, problems)
    _check_files(images, image_dir, decode_sample, problems)
    problems.raise_any()
    if classes is not None:
        check_classes(list(classes), path, f'data.classes ({split_name}.ann)')
    if training:
        if not usable:
            of_classes = ' of data.classes' if classes is not None else ''
            raise ConfigError(f'{where}: nothing to train on: every annotation{of_classes} is crowd or empty')
        summary.unannotated_images = len(images) - len(annotated)
        summary.crowd_only_images = len(crowd - usable)
        summary.background_images = len(annotated - usable - crowd)
    return summary


def _check_images(records: list, problems: _Problems) -> dict:
    """image id -> (height, width, file_name), for the well-formed records."""
    images = {}
    for i, image in enumerate(records):
        if not isinstance(image, dict):
            problems.add(f'image #{i}: not an object')
            continue
        image_id, height, width, file_name = (image.get(k) for k in ('id', 'height', 'width', 'file_name'))
        label = f'image {image_id}' if image_id is not None else f'image #{i}'
        if not isinstance(image_id, (int, str)) or isinstance(image_id, bool):
            problems.add(f'{label}: needs an integer (or string) id')
        elif image_id in images:
            problems.add(f'{label}: id used by more than one image')
        elif not (_is_size(height) and _is_size(width)):
            problems.add(f'{label}: height and width must be positive integers, got {height!r}, {width!r}')
        elif not isinstance(file_name, str) or not file_name:
            problems.add(f'{label}: needs a file_name')
        else:
            images[image_id] = (int(height), int(width), file_name)
    return images


def _is_size(value) -> bool:
    return type(value) in _NUMBER and value > 0 and float(value).is_integer()


def _check_annotations(annotations, images, category_ids, selected, training, summary, problems):
    """The annotation pass. Returns, for ``selected`` categories, the ids of images with any
    annotation, with a usable (non-crowd, non-empty) one, and with a crowd one."""
    annotated, usable, crowd_images = set(), set(), set()
    seen_ids = set()
    coords, polygon_ends, polygon_owner = [], [], []  # every polygon, checked at once below
    owners = []  # (label, area, bbox, mmdet trains on it) of annotations with polygons
    for i, ann in enumerate(annotations):
        if not isinstance(ann, dict):
            problems.add(f'annotation #{i}: not an object')
            continue
        ann_id, image_id = ann.get('id'), ann.get('image_id')
        label = f'annotation {ann_id} (image {image_id})'
        if ann_id is None or isinstance(ann_id, (list, dict)):
            problems.add(f'annotation #{i} (image {image_id}): needs an id')
            continue
        if ann_id in seen_ids:
            problems.add(f'{label}: id used by more than one annotation (mmdet requires unique ids)')
            continue
        seen_ids.add(ann_id)
        image = images.get(image_id) if isinstance(image_id, (int, str)) else None
        if image is None:
            problems.add(f'{label}: image id {image_id!r} is not among the images')
            continue
        height, width = image[0], image[1]
        category_id = ann.get('category_id')
        if type(category_id) is not int or category_id not in category_ids:
            problems.add(f'{label}: category id {category_id!r} is not among the categories {sorted(category_ids)}')
            continue
        bbox, area = ann.get('bbox'), ann.get('area')
        if not (type(bbox) is list and len(bbox) == 4 and all(type(v) in _NUMBER and math.isfinite(v) for v in bbox)):
            problems.add(f'{label}: bbox must be [x, y, width, height], got {bbox!r}')
            continue
        if type(area) not in _NUMBER or not math.isfinite(area):
            problems.add(f'{label}: area must be a number, got {area!r}')
            continue
        crowd = bool(ann.get('iscrowd', 0))
        # mmdet's CocoDataset.parse_data_info drops these; nothing else of them is read.
        x, y, w, h = bbox
        inside = max(0, min(x + w, width) - max(x, 0)) * max(0, min(y + h, height) - max(y, 0))
        dropped = bool(ann.get('ignore', False)) or inside == 0 or area <= 0 or w < 1 or h < 1
        summary.empty_boxes += dropped
        segmentation = ann.get('segmentation')
        if isinstance(segmentation, list) and segmentation:
            owner = len(owners)
            for k, polygon in enumerate(segmentation):
                n = len(polygon) if type(polygon) is list else -1
                if n < 0:
                    problems.add(f'{label}: segmentation must be a list of polygons [[x1, y1, x2, y2, ...], ...] '
                                 'or an RLE {"counts": ..., "size": [height, width]}')
                    break
                if n % 2:
                    problems.add(f'{label}: polygon {k} has an odd number of coordinates ({n})')
                elif n < 6:
                    problems.add(f'{label}: polygon {k} has fewer than 3 points ({n // 2})')
                else:
                    coords.extend(polygon)
                    polygon_ends.append(len(coords))
                    polygon_owner.append(owner)
            owners.append((label, area, bbox, not dropped and not crowd and category_id in selected))
        elif isinstance(segmentation, dict) and segmentation:
            problem = _rle_problem(segmentation, height, width)
            if problem:
                problems.add(f'{label}: {problem}')
        elif not dropped:  # mmdet keeps the instance and then fails on its missing mask
            problems.add(f'{label}: no segmentation' if not segmentation else
                         f'{label}: segmentation must be a list of polygons or an RLE, got {segmentation!r}'[:300])
        if category_id in selected:
            annotated.add(image_id)
            if crowd and not dropped:
                crowd_images.add(image_id)
            elif not dropped:
                usable.add(image_id)  # (unless its polygons have no area: an error below)
    _check_polygons(coords, polygon_ends, polygon_owner, owners, training, summary, problems)
    return annotated, usable, crowd_images


def _check_polygons(coords, ends, polygon_owner, owners, training, summary, problems) -> None:
    """Coordinates and areas of every polygon at once (shoelace formula, NumPy)."""
    if not ends:
        return
    try:
        points = np.array(coords)
    except ValueError:  # a nested list among the coordinates
        points = np.array([], dtype=object)
    if points.dtype.kind not in 'iuf' or not np.isfinite(points).all():
        start = 0
        for end, owner in zip(ends, polygon_owner):
            polygon = coords[start:end]
            if not all(type(v) in _NUMBER and math.isfinite(v) for v in polygon):
                problems.add(f'{owners[owner][0]}: polygon coordinates must be numbers, got {polygon!r}'[:300])
                return
            start = end
    points = points.astype(np.float64).reshape(-1, 2)
    ends = np.asarray(ends) // 2
    starts = np.concatenate([[0], ends[:-1]])
    following = np.arange(1, len(points) + 1)
    following[ends - 1] = starts  # each polygon's last point closes on its first
    cross = points[:, 0] * points[following, 1] - points[following, 0] * points[:, 1]
    degenerate = np.abs(np.add.reduceat(cross, starts)) / 2 < DEGENERATE_AREA
    summary.degenerate_polygons += int(degenerate.sum())
    polygon_owner = np.asarray(polygon_owner)
    polygons = np.bincount(polygon_owner, minlength=len(owners))
    without_area = np.flatnonzero(np.bincount(polygon_owner[degenerate], minlength=len(owners)) == polygons)
    for owner in without_area:
        label, area, bbox, trained = owners[owner]
        if training and trained and polygons[owner]:
            problems.add(f'{label}: its polygons enclose no area, yet its area is {area} and its bbox {bbox} '
                         'is not empty, so mmdet would train it with an empty mask; fix the polygons, '
                         'or set its area to 0 to skip it')


def _rle_problem(rle: dict, height: int, width: int) -> str | None:
    counts, size = rle.get('counts'), rle.get('size')
    if not (type(size) is list and len(size) == 2 and all(type(v) is int for v in size)):
        return f'RLE size must be [height, width], got {size!r}'
    if size != [height, width]:
        return f"RLE size {size} differs from its image's [height, width] [{height}, {width}]"
    if type(counts) is list:
        runs = np.array(counts)
        if runs.dtype.kind not in 'iu' or (runs < 0).any() or runs.sum() != height * width:
            return (f'RLE counts must be non-negative integers summing to height * width = {height * width}'
                    + (f', not {runs.sum()}' if runs.dtype.kind in 'iu' else ''))
        return None
    if type(counts) is str:
        runs = _compressed_rle_counts(counts)
        if runs is None or runs.sum() != height * width:
            return (f'RLE counts is not a valid compressed RLE of {height * width} pixels'
                    + (f' (its runs sum to {runs.sum()})' if runs is not None else ''))
        return None
    return f'RLE counts must be a list of run lengths or a compressed string, got {type(counts).__name__}'


def _compressed_rle_counts(text: str):
    """The run lengths of a compressed RLE string (pycocotools' rleFrString), or None where
    pycocotools would read past its end or produce a negative run (its decoder overflows then)."""
    runs, value, shift = [], 0, 0
    for char in text.encode('latin-1', 'replace'):
        c = char - 48
        if not 0 <= c < 64:
            return None
        value |= (c & 0x1f) << shift
        shift += 5
        if c & 0x20:
            continue
        if c & 0x10:
            value -= 1 << shift  # sign extension
        if len(runs) > 2:
            value += runs[-2]  # runs after the third are stored as differences
        if not 0 <= value < 2 ** 32:
            return None
        runs.append(value)
        value = shift = 0
    return None if shift else np.array(runs, dtype=np.int64)


def _check_files(images: dict, image_dir: Path, decode_sample: int, problems: _Problems) -> None:
    """Existence of every image (a directory listing per folder); decoding of a spread sample."""
    folders = defaultdict(list)
    for image_id, (_, _, file_name) in images.items():
        folder, name = os.path.split(os.path.join(image_dir, file_name))
        folders[folder].append((image_id, name))
    found = []
    for folder, entries in folders.items():
        try:
            listing = set(os.listdir(folder))
        except OSError:
            listing = set()
        for image_id, name in entries:
            if name in listing:
                found.append(image_id)
            else:
                problems.add(f'image {image_id}: file not found: {os.path.join(folder, name)}')
    if decode_sample <= 0 or not found:
        return
    import cv2
    spread = np.unique(np.linspace(0, len(found) - 1, min(decode_sample, len(found))).round().astype(int))
    for image_id in (found[i] for i in spread):
        height, width, file_name = images[image_id]
        file = image_dir / file_name
        try:  # as mmdet's LoadImageFromFile reads it (mmcv.imfrombytes, flag 'color': EXIF rotation applied)
            pixels = cv2.imdecode(np.fromfile(file, dtype=np.uint8), cv2.IMREAD_COLOR)
        except (OSError, cv2.error):
            pixels = None
        if pixels is None:
            problems.add(f'image {image_id}: cannot decode {file} (not an image, or not a format OpenCV reads)')
        elif pixels.shape[:2] != (height, width):
            problems.add(f'image {image_id}: {file} is {pixels.shape[0]} px high and {pixels.shape[1]} wide, '
                         f'but the annotation file says height {height}, width {width}')
