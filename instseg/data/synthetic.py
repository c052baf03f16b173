"""A deterministic synthetic instance-segmentation data set in COCO format.

Shapes of several classes with random colours, sizes from a few pixels to half the image, random
rotation, on cluttered backgrounds. Later shapes occlude earlier ones; a placement that would hide
more than half of an earlier instance is re-drawn, so every annotated instance stays recognisable
and no visible object goes unannotated. Masks are the *visible* region, stored as RLE.

Each image also has a per-pixel class map (``semantic/<split>/<image>.png``, COCO-stuff's convention:
a thing's category id - 1, and ``len(CLASSES)`` for background), for semantic branches such as HTC's.

Every image is drawn from its own seed ``(seed, split, index)``, so the set is identical whatever
the order or number of processes that generate it.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

import cv2
import numpy as np
from pycocotools import mask as mask_utils

CLASSES = ('circle', 'square', 'triangle', 'star', 'ring')
SEMANTIC_CLASSES = len(CLASSES) + 1  # the shapes and the background
GENERATOR_VERSION = 2
SPLITS = ('train', 'val')


@dataclass(frozen=True)
class SyntheticSpec:
    num_train: int = 1000
    num_val: int = 200
    image_size: int = 128
    min_object_size: int = 8
    max_objects: int = 8
    seed: int = 0

    def __post_init__(self):
        if self.min_object_size * 2 > self.image_size:
            raise ValueError(f'data.synthetic: min_object_size={self.min_object_size} must be at '
                             f'most half of image_size={self.image_size}')
        if min(self.num_train, self.num_val, self.max_objects) < 1:
            raise ValueError('data.synthetic: num_train, num_val and max_objects must be >= 1')

    def key(self) -> str:
        blob = json.dumps({'version': GENERATOR_VERSION, **asdict(self)}, sort_keys=True)
        return hashlib.sha1(blob.encode()).hexdigest()[:10]


def ann_file(split: str) -> str:
    return f'annotations/instances_{split}.json'


def img_dir(split: str) -> str:
    return f'{split}/'


def seg_dir(split: str) -> str:
    return f'semantic/{split}/'


def dataset_dir(cache_dir: str | os.PathLike, spec: SyntheticSpec) -> Path:
    return Path(cache_dir) / f'synthetic-{spec.key()}'


def ensure_dataset(root: str | os.PathLike, spec: SyntheticSpec) -> Path:
    """Generates the data set into ``root`` unless it is already there (atomic, race-free)."""
    root = Path(root)
    if (root / ann_file('val')).is_file():
        return root
    root.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=root.name + '.tmp', dir=root.parent))
    try:
        for split_index, split in enumerate(SPLITS):
            _write_split(tmp, split, split_index, spec)
        try:
            os.rename(tmp, root)
        except OSError:  # another process finished first: its copy is identical
            if not (root / ann_file('val')).is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return root


def _write_split(root: Path, split: str, split_index: int, spec: SyntheticSpec) -> None:
    count = spec.num_train if split == 'train' else spec.num_val
    (root / img_dir(split)).mkdir(parents=True)
    (root / seg_dir(split)).mkdir(parents=True)
    (root / 'annotations').mkdir(exist_ok=True)
    images, annotations = [], []
    for index in range(count):
        rng = np.random.default_rng([spec.seed, split_index, index])
        image, instances = draw_image(rng, spec)
        file_name = f'{index:06d}.png'
        cv2.imwrite(str(root / img_dir(split) / file_name), image[..., ::-1],  # RGB -> BGR
                    [cv2.IMWRITE_PNG_COMPRESSION, 1])
        cv2.imwrite(str(root / seg_dir(split) / file_name), semantic_map(instances, spec.image_size))
        image_id = index + 1
        images.append(dict(id=image_id, file_name=file_name, height=spec.image_size,
                           width=spec.image_size))
        for label, mask in instances:
            rle = mask_utils.encode(np.asfortranarray(mask))
            x, y, w, h = mask_utils.toBbox(rle).tolist()
            annotations.append(dict(
                id=len(annotations) + 1, image_id=image_id, category_id=label + 1, iscrowd=0,
                area=float(mask_utils.area(rle)), bbox=[x, y, w, h],
                segmentation=dict(size=rle['size'], counts=rle['counts'].decode('ascii'))))
    categories = [dict(id=i + 1, name=name, supercategory='shape') for i, name in enumerate(CLASSES)]
    with open(root / ann_file(split), 'w') as f:
        json.dump(dict(images=images, annotations=annotations, categories=categories,
                       info=dict(description=f'instseg synthetic shapes, {split}', spec=asdict(spec))), f)


def semantic_map(instances, size: int) -> np.ndarray:
    """The per-pixel class map of an image's (visible, disjoint) instance masks."""
    classes = np.full((size, size), len(CLASSES), dtype=np.uint8)
    for label, mask in instances:
        classes[mask.astype(bool)] = label
    return classes


def draw_image(rng: np.random.Generator, spec: SyntheticSpec):
    """Returns an RGB uint8 image and a list of (class index, visible mask) for its instances."""
    size = spec.image_size
    image = _background(rng, size)
    owner = np.full((size, size), -1, dtype=np.int32)  # which instance each pixel shows
    full_areas, labels = [], []
    for _ in range(int(rng.integers(1, spec.max_objects + 1))):
        for _attempt in range(10):
            label = int(rng.integers(len(CLASSES)))
            shape = _shape_mask(rng, CLASSES[label], size, spec.min_object_size)
            if shape.sum() < 12:
                continue
            new_owner = np.where(shape, len(labels), owner)
            visible = np.bincount(new_owner[new_owner >= 0].ravel(), minlength=len(labels) + 1)
            if all(visible[i] >= 0.5 * full_areas[i] for i in range(len(labels))):
                break
        else:
            continue  # no placement keeps the earlier instances recognisable
        owner = new_owner
        full_areas.append(int(shape.sum()))
        labels.append(label)
        image[shape] = _fill(rng, shape)
    noise = rng.normal(0, 6, image.shape)
    image = np.clip(image.astype(np.float32) + noise, 0, 255).astype(np.uint8)
    instances = [(label, (owner == i).astype(np.uint8)) for i, label in enumerate(labels)]
    return image, instances


def _background(rng, size):
    top, bottom = rng.integers(0, 256, (2, 3))
    ramp = np.linspace(0, 1, size)[:, None, None]
    image = (top * (1 - ramp) + bottom * ramp).repeat(size, axis=1)
    image = np.ascontiguousarray(image.astype(np.uint8))
    for _ in range(int(rng.integers(0, 6))):  # clutter: thin lines that are not objects
        p1, p2 = rng.integers(0, size, (2, 2))
        colour = tuple(int(c) for c in rng.integers(0, 256, 3))
        cv2.line(image, tuple(map(int, p1)), tuple(map(int, p2)), colour, 1, cv2.LINE_AA)
    return image


def _fill(rng, shape):
    """Colours for the pixels of ``shape``: flat or a two-tone gradient, so colour alone never
    identifies the class."""
    a, b = rng.integers(0, 256, (2, 3))
    if rng.random() < 0.5:
        b = a
    angle = rng.uniform(0, np.pi)
    ys, xs = np.nonzero(shape)
    t = np.cos(angle) * xs + np.sin(angle) * ys
    t = ((t - t.min()) / max(t.max() - t.min(), 1e-6))[:, None]
    return (a * (1 - t) + b * t).astype(np.uint8)


def _shape_mask(rng, name, size, min_size):
    # Log-uniform object size: as many small objects as large ones, like COCO's S/M/L spread.
    extent = float(np.exp(rng.uniform(np.log(min_size), np.log(size / 2))))
    radius = extent / 2
    cx, cy = rng.uniform(radius * 0.5, size - radius * 0.5, 2)
    angle = rng.uniform(0, 2 * np.pi)
    mask = np.zeros((size, size), np.uint8)
    scale = 16  # sub-pixel precision for cv2's fixed-point drawing
    centre = (int(cx * scale), int(cy * scale))
    if name in ('circle', 'ring'):
        cv2.circle(mask, centre, int(radius * scale), 1, -1, cv2.LINE_8, shift=4)
        if name == 'ring':
            cv2.circle(mask, centre, int(radius * 0.5 * scale), 0, -1, cv2.LINE_8, shift=4)
        return mask.astype(bool)
    if name == 'square':
        corners, radii = 4, [radius] * 4
    elif name == 'triangle':
        corners, radii = 3, [radius] * 3
    else:  # star: five points, alternating outer and inner radius
        corners, radii = 10, [radius, radius * 0.45] * 5
    theta = angle + np.arange(corners) * 2 * np.pi / corners
    points = np.stack([cx + np.cos(theta) * radii, cy + np.sin(theta) * radii], axis=1)
    cv2.fillPoly(mask, [np.round(points * scale).astype(np.int32)], 1, cv2.LINE_8, shift=4)
    return mask.astype(bool)
