"""instseg.data.validate: each problem ends as one line naming the file and the annotation/image;
what mmdet skips by itself is counted, and mmdet's dataset really leaves it out."""
import copy
import json
import re

import cv2
import numpy as np
import pytest
from pycocotools import mask as mask_utils

from conftest import run_tool
from instseg.data import coco, synthetic
from instseg.data.validate import validate_coco
from instseg.errors import ConfigError

HEIGHT, WIDTH = 32, 40
SQUARE = [4, 4, 20, 4, 20, 20, 4, 20]  # 16 x 16 px
LINE = [2, 2, 10, 10, 30, 30]  # three collinear points: no area


def _rle(mask: np.ndarray) -> dict:
    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    return dict(size=rle['size'], counts=rle['counts'].decode('ascii'))


def _crowd_rle() -> dict:
    """COCO's crowd format: uncompressed runs (column-major), alternating background/foreground."""
    return dict(size=[HEIGHT, WIDTH], counts=[100, 50, HEIGHT * WIDTH - 150])


def _base() -> dict:
    """Three images of two categories: a polygon, a compressed RLE, a crowd RLE beside a polygon."""
    blob = np.zeros((HEIGHT, WIDTH), np.uint8)
    blob[8:24, 10:30] = 1
    images = [dict(id=i, file_name=f'{i}.png', height=HEIGHT, width=WIDTH) for i in (1, 2, 3)]
    annotations = [
        dict(id=1, image_id=1, category_id=1, iscrowd=0, area=256.0, bbox=[4, 4, 16, 16], segmentation=[SQUARE]),
        dict(id=2, image_id=2, category_id=2, iscrowd=0, area=320.0, bbox=[10, 8, 20, 16], segmentation=_rle(blob)),
        dict(id=3, image_id=3, category_id=2, iscrowd=1, area=50.0, bbox=[3, 4, 2, 32], segmentation=_crowd_rle()),
        dict(id=4, image_id=3, category_id=1, iscrowd=0, area=256.0, bbox=[4, 4, 16, 16], segmentation=[SQUARE]),
    ]
    return dict(images=images, annotations=annotations,
                categories=[dict(id=1, name='a'), dict(id=2, name='b')])


def _write(root, content, text=None):
    """Writes the annotation file (``text`` verbatim when given) and any missing image."""
    (root / 'images').mkdir(parents=True, exist_ok=True)
    for image in content.get('images', []):
        file = root / 'images' / image['file_name']
        if not file.exists():
            cv2.imwrite(str(file), np.full((image['height'], image['width'], 3), 127, np.uint8))
    path = root / 'ann.json'
    path.write_text(text if text is not None else json.dumps(content))
    return path


def _validate(root, content, text=None, **kwargs):
    return validate_coco(_write(root, content, text), root / 'images', 'data.train', training=True, **kwargs)


def _error(root, content, text=None, **kwargs) -> str:
    with pytest.raises(ConfigError) as e:
        _validate(root, content, text, **kwargs)
    message = str(e.value)
    assert '\n' not in message
    return message


def _ann(content, ann_id):
    return next(a for a in content['annotations'] if a['id'] == ann_id)


def test_valid_data_passes_with_nothing_to_report(tmp_path):
    summary = _validate(tmp_path, _base())
    assert (summary.images, summary.annotations) == (3, 4)
    assert summary.line() is None


def test_the_synthetic_set_is_valid(tmp_path):
    spec = synthetic.SyntheticSpec(num_train=6, num_val=2, image_size=32, min_object_size=4, max_objects=3)
    root = synthetic.ensure_dataset(tmp_path / 'syn', spec)
    summary = validate_coco(root / synthetic.ann_file('train'), root / synthetic.img_dir('train'), 'data.train',
                            classes=list(synthetic.CLASSES), training=True)
    assert summary.images == 6 and summary.annotations > 0 and summary.line() is None


def test_unreadable_or_truncated_json(tmp_path):
    text = json.dumps(_base())
    message = _error(tmp_path, _base(), text=text[:len(text) // 2])
    assert message.startswith(f'data.train.ann: {tmp_path / "ann.json"}: not a readable JSON file (')
    assert 'not a COCO annotation file (a JSON list' in _error(tmp_path, _base(), text='[1, 2]')


@pytest.mark.parametrize('key, message', [
    ('images', 'not a COCO annotation file (missing images)'),
    ('categories', 'not a COCO annotation file (missing categories)'),
    ('annotations', 'no annotations (an image-info file without them serves only tools/test.py format_only=true)'),
])
def test_missing_top_level_list(tmp_path, key, message):
    content = _base()
    del content[key]
    assert message in _error(tmp_path, content)


def test_empty_category_list(tmp_path):
    content = _base()
    content['categories'] = []
    assert 'categories must be a non-empty list' in _error(tmp_path, content)


def test_annotation_of_a_missing_image(tmp_path):
    content = _base()
    _ann(content, 2)['image_id'] = 99
    assert _error(tmp_path, content) == \
        f'data.train ({tmp_path / "ann.json"}): annotation 2 (image 99): image id 99 is not among the images'


def test_unknown_category(tmp_path):
    content = _base()
    _ann(content, 1)['category_id'] = 7
    assert _error(tmp_path, content).endswith(
        'annotation 1 (image 1): category id 7 is not among the categories [1, 2]')


def test_missing_image_file(tmp_path):
    path = _write(tmp_path, _base())
    (tmp_path / 'images' / '2.png').unlink()
    with pytest.raises(ConfigError, match=f'image 2: file not found: {re.escape(str(tmp_path))}/images/2.png$'):
        validate_coco(path, tmp_path / 'images', 'data.train')


def test_undecodable_image_file(tmp_path):
    _write(tmp_path, _base())
    (tmp_path / 'images' / '3.png').write_bytes(b'<html>not found</html>')
    assert _error(tmp_path, _base()).endswith(
        f'image 3: cannot decode {tmp_path / "images" / "3.png"} (not an image, or not a format OpenCV reads)')


def test_image_of_another_size_than_the_file_says(tmp_path):
    _write(tmp_path, _base())
    cv2.imwrite(str(tmp_path / 'images' / '1.png'), np.zeros((64, 80, 3), np.uint8))
    assert _error(tmp_path, _base()).endswith(
        'image 1: ' + str(tmp_path / 'images' / '1.png') + ' is 64 px high and 80 wide, '
        f'but the annotation file says height {HEIGHT}, width {WIDTH}')


def test_decoding_is_a_bounded_spread_sample(tmp_path):
    """Every file must exist; only ``decode_sample`` of them, first and last included, are decoded."""
    content = _base()
    content['images'] += [dict(id=i, file_name=f'{i}.png', height=HEIGHT, width=WIDTH) for i in range(4, 11)]
    _write(tmp_path, content)
    (tmp_path / 'images' / '10.png').write_bytes(b'')
    assert 'image 10: cannot decode' in _error(tmp_path, content, decode_sample=2)
    (tmp_path / 'images' / '10.png').unlink()
    (tmp_path / 'images' / '5.png').write_bytes(b'')
    _validate(tmp_path, content, decode_sample=2)  # 5.png is not among the 2 decoded (1 and 10)


@pytest.mark.parametrize('polygon, message', [
    (SQUARE + [7], 'polygon 0 has an odd number of coordinates (9)'),
    ([4, 4, 20, 20], 'polygon 0 has fewer than 3 points (2)'),
    ([4, 4, 20, 'x', 4, 20], "polygon coordinates must be numbers, got [4, 4, 20, 'x', 4, 20]"),
    ([4, 4, 20, [4], 4, 20], 'polygon coordinates must be numbers, got [4, 4, 20, [4], 4, 20]'),
])
def test_malformed_polygon(tmp_path, polygon, message):
    content = _base()
    _ann(content, 1)['segmentation'] = [polygon]
    assert _error(tmp_path, content).endswith(f'annotation 1 (image 1): {message}')


@pytest.mark.parametrize('ann_id, change, message', [
    (3, dict(counts=[100, 50, 10]), f'RLE counts must be non-negative integers summing to height * width = '
                                    f'{HEIGHT * WIDTH}, not 160'),
    (3, dict(counts=[100, -50, HEIGHT * WIDTH - 50]), 'RLE counts must be non-negative integers'),
    (2, dict(counts='PPYo1'), f'RLE counts is not a valid compressed RLE of {HEIGHT * WIDTH} pixels'),
    (2, dict(counts='0g'), 'RLE counts is not a valid compressed RLE'),  # ends inside a number
    (2, dict(size=[WIDTH, HEIGHT]), f"RLE size [{WIDTH}, {HEIGHT}] differs from its image's [height, width] "
                                    f'[{HEIGHT}, {WIDTH}]'),
])
def test_malformed_rle(tmp_path, ann_id, change, message):
    content = _base()
    _ann(content, ann_id)['segmentation'].update(change)
    assert message in _error(tmp_path, content)


def test_missing_segmentation_and_duplicate_ids(tmp_path):
    """Both crash mmdet: a kept instance without a mask (KeyError), repeated ids (assert)."""
    content = _base()
    _ann(content, 1)['segmentation'] = []
    assert _error(tmp_path, content).endswith('annotation 1 (image 1): no segmentation')
    content = _base()
    _ann(content, 4)['id'] = 1
    assert 'annotation 1 (image 3): id used by more than one annotation' in _error(tmp_path, content)


def test_every_problem_is_counted_and_the_first_named(tmp_path):
    content = _base()
    _ann(content, 1)['category_id'] = 7
    _ann(content, 2)['image_id'] = 99
    assert _error(tmp_path, content).endswith('category id 7 is not among the categories [1, 2] '
                                              '(and 1 more problem in this file)')


def test_annotation_file_or_data_root_not_found(tmp_path):
    from instseg.cli import compose
    from instseg.engine.runner import prepare_data

    not_found = f'^data.train.ann: annotation file not found: {re.escape(str(tmp_path))}/none.json$'
    with pytest.raises(ConfigError, match=not_found):
        validate_coco(tmp_path / 'none.json', tmp_path, 'data.train')
    missing = tmp_path / 'missing'
    # data.classes read from the annotation file: config time names the first missing directory.
    hint = f'annotation file not found: .* \\({re.escape(str(missing))} does not exist\\)$'
    with pytest.raises(ConfigError, match=hint):
        compose('train', ['data=coco', f'data.root={missing}'])
    cfg = compose('train', ['data=coco', f'data.root={missing}', 'data.classes=[a]'])
    with pytest.raises(ConfigError, match=f'^data.root: directory not found: {re.escape(str(missing))}$'):
        prepare_data(cfg, ('train', 'val'))


def test_classes_absent_from_the_file(tmp_path):
    with pytest.raises(ConfigError, match=r"data.classes \(data.train.ann\): \['c'\] not among the categories"):
        validate_coco(_write(tmp_path, _base()), tmp_path / 'images', 'data.train', classes=['a', 'c'])


def _skippable() -> dict:
    """The base plus what mmdet skips: an empty box, a polygon without area (the instance's only one,
    area 0, as COCO's own annotation 918), one beside a valid polygon, and a crowd-only image."""
    content = _base()
    content['images'].append(dict(id=4, file_name='4.png', height=HEIGHT, width=WIDTH))
    content['annotations'] += [
        dict(id=5, image_id=1, category_id=1, iscrowd=0, area=0.0, bbox=[4, 4, 0, 16],
             segmentation=[[4, 4, 4, 12, 4, 20]]),
        dict(id=6, image_id=2, category_id=2, iscrowd=0, area=0.0, bbox=[2, 2, 28, 28], segmentation=[LINE]),
        dict(id=7, image_id=2, category_id=1, iscrowd=0, area=256.0, bbox=[4, 4, 16, 16], segmentation=[SQUARE, LINE]),
        dict(id=8, image_id=4, category_id=2, iscrowd=1, area=50.0, bbox=[3, 4, 2, 32], segmentation=_crowd_rle()),
    ]
    return content


def test_what_mmdet_skips_is_counted_in_one_line(tmp_path):
    summary = _validate(tmp_path, _skippable())
    assert (summary.empty_boxes, summary.degenerate_polygons, summary.crowd_only_images) == (2, 3, 1)
    assert summary.line() == (
        f'data.train ({tmp_path / "ann.json"}): skipped 2 empty boxes (w or h < 1 px, area 0, or outside the image), '
        '3 degenerate polygons (no area); 1 crowd-only image trains as background (no instance to learn)')
    val = validate_coco(tmp_path / 'ann.json', tmp_path / 'images', 'data.val')
    assert val.line().endswith("(no area): kept in the ground truth COCO's evaluation scores")


def test_mmdet_really_leaves_the_skipped_out(tmp_path):
    """What the summary line says: mmdet's CocoDataset drops the empty instances, rasterizes a
    polygon without area to no pixel, and keeps the crowd-only image with only ignored instances."""
    from mmdet.datasets import CocoDataset
    from mmdet.datasets.transforms import LoadAnnotations

    content = _skippable()
    _write(tmp_path, content)
    dataset = CocoDataset(ann_file='ann.json', data_root=str(tmp_path), data_prefix=dict(img='images'),
                          metainfo=dict(classes=('a', 'b')), filter_cfg=dict(filter_empty_gt=True, min_size=8),
                          pipeline=[])
    infos = {info['img_id']: info for info in map(dataset.get_data_info, range(len(dataset)))}
    assert [len(infos[i]['instances']) for i in (1, 2, 3, 4)] == [1, 2, 2, 1]  # 5 and 6 dropped
    load = LoadAnnotations(with_bbox=True, with_mask=True)
    masks = load(dict(copy.deepcopy(infos[2]), ori_shape=(HEIGHT, WIDTH)))['gt_masks'].masks
    assert masks[1].sum() == masks[1][4:20, 4:20].sum() == 16 * 16  # annotation 7: the square only
    assert [inst['ignore_flag'] for inst in infos[4]['instances']] == [1]


def test_polygon_without_area_that_mmdet_would_train_on_is_an_error(tmp_path):
    """mmdet keeps an instance whose area and box are not empty, and would learn an empty mask."""
    content = _base()
    _ann(content, 1)['segmentation'] = [LINE]
    assert _error(tmp_path, content).endswith(
        'annotation 1 (image 1): its polygons enclose no area, yet its area is 256.0 and its bbox [4, 4, 16, 16] '
        'is not empty, so mmdet would train it with an empty mask; fix the polygons, or set its area to 0 to skip it')
    assert validate_coco(tmp_path / 'ann.json', tmp_path / 'images', 'data.val').degenerate_polygons == 1


def test_nothing_to_train_on(tmp_path):
    content = _base()
    for ann in content['annotations']:
        ann['iscrowd'] = 1
    assert _error(tmp_path, content).endswith('nothing to train on: every annotation is crowd or empty')


def test_the_file_is_parsed_once_and_released(tmp_path, capsys, monkeypatch):
    """The class names (config time) and the validator share one parse; prepare_data frees it."""
    from instseg.cli import compose
    from instseg.engine.runner import prepare_data

    _write(tmp_path, _skippable())
    parses = []
    monkeypatch.setattr(coco.json, 'load', lambda f: parses.append(f.name) or json.loads(f.read()))
    cfg = compose('train', ['data=coco', f'data.root={tmp_path}', 'data.train.ann=ann.json',
                            'data.train.img=images', 'data.val.ann=ann.json', 'data.val.img=images'])
    prepare_data(cfg, ('train', 'val'))
    assert parses == [str(tmp_path / 'ann.json')] and coco._parse.cache_info().currsize == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split(' (')[0] for line in lines] == ['data.train', 'data.val']


def test_train_tool_stops_on_bad_data_in_one_line(tmp_path):
    content = _base()
    _ann(content, 1)['segmentation'] = [SQUARE + [7]]
    _write(tmp_path, content)
    work_dir = tmp_path / 'work'
    proc = run_tool('train', 'data=coco', f'data.root={tmp_path}', 'data.train.ann=ann.json', 'data.train.img=images',
                    'data.val.ann=ann.json', 'data.val.img=images', f'work_dir={work_dir}', check=False)
    assert proc.returncode == 2 and 'Traceback' not in proc.stderr
    assert proc.stderr.strip() == (f'error: data.train ({tmp_path / "ann.json"}): annotation 1 (image 1): '
                                   'polygon 0 has an odd number of coordinates (9)')
    assert not (work_dir / 'config.yaml').exists()
