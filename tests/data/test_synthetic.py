import json

import numpy as np
import pytest
from pycocotools import mask as mask_utils

from instseg.data import synthetic
from instseg.data.synthetic import CLASSES, SyntheticSpec, draw_image, ensure_dataset

SPEC = SyntheticSpec(num_train=40, num_val=10, image_size=128)


@pytest.fixture(scope='module')
def dataset(tmp_path_factory):
    root = ensure_dataset(tmp_path_factory.mktemp('syn') / 'a', SPEC)
    return root, json.loads((root / synthetic.ann_file('train')).read_text())


def test_images_are_deterministic():
    a = draw_image(np.random.default_rng([0, 0, 3]), SPEC)
    b = draw_image(np.random.default_rng([0, 0, 3]), SPEC)
    c = draw_image(np.random.default_rng([0, 0, 4]), SPEC)
    assert np.array_equal(a[0], b[0]) and len(a[1]) == len(b[1])
    assert not np.array_equal(a[0], c[0])


def test_generation_is_reproducible(dataset, tmp_path):
    root, _ = dataset
    again = ensure_dataset(tmp_path / 'b', SPEC)
    for split in synthetic.SPLITS:
        assert (root / synthetic.ann_file(split)).read_bytes() == (again / synthetic.ann_file(split)).read_bytes()
    assert (root / 'train' / '000007.png').read_bytes() == (again / 'train' / '000007.png').read_bytes()


def test_annotations_are_valid_coco(dataset):
    root, coco = dataset
    assert [c['name'] for c in coco['categories']] == list(CLASSES)
    assert len(coco['images']) == SPEC.num_train
    assert {a['category_id'] for a in coco['annotations']} == set(range(1, len(CLASSES) + 1))
    for ann in coco['annotations']:
        rle = dict(ann['segmentation'], counts=ann['segmentation']['counts'].encode())
        assert mask_utils.area(rle) == ann['area'] > 0
        assert np.allclose(mask_utils.toBbox(rle), ann['bbox'])


def test_instances_span_sizes_and_occlude(dataset):
    _, coco = dataset
    sides = np.array([max(a['bbox'][2:]) for a in coco['annotations']])
    assert sides.min() <= 12 and sides.max() >= SPEC.image_size / 3  # small and large objects
    # Occlusion: some instance's visible area is well below its box's (it is partly hidden).
    by_image = {}
    for a in coco['annotations']:
        by_image.setdefault(a['image_id'], []).append(a)
    overlapping = 0
    for anns in by_image.values():
        masks = [mask_utils.decode(dict(a['segmentation'], counts=a['segmentation']['counts'].encode()))
                 for a in anns]
        assert max(np.sum(masks, axis=0).ravel()) <= 1  # visible masks never overlap
        boxes = np.array([a['bbox'] for a in anns])
        ious = mask_utils.iou(boxes, boxes, [0] * len(boxes))
        overlapping += int((ious[np.triu_indices(len(boxes), 1)] > 0).sum())
    assert overlapping > 10


def test_spec_is_checked():
    with pytest.raises(ValueError, match='min_object_size'):
        SyntheticSpec(image_size=16, min_object_size=10)


def test_semantic_maps_are_the_instances_classes(dataset):
    """The per-pixel class map of each image: its instances' category id - 1, background len(CLASSES)."""
    import cv2
    root, coco = dataset
    for image in coco['images'][:10]:
        semantic = cv2.imread(str(root / synthetic.seg_dir('train') / image['file_name']), cv2.IMREAD_UNCHANGED)
        expected = np.full((image['height'], image['width']), len(CLASSES), dtype=np.uint8)
        for a in coco['annotations']:
            if a['image_id'] == image['id']:
                mask = mask_utils.decode(dict(a['segmentation'], counts=a['segmentation']['counts'].encode()))
                expected[mask.astype(bool)] = a['category_id'] - 1
        assert semantic.dtype == np.uint8 and np.array_equal(semantic, expected)
    assert synthetic.SEMANTIC_CLASSES == len(CLASSES) + 1
