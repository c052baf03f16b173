"""An image or semantic map that cannot be decoded mid-run stops it with one line naming the file,
also when a DataLoader worker read it."""
import cv2
import numpy as np
import pytest

from instseg.cli import one_line
from instseg.data.transforms import LoadAnnotationsChecked, LoadImageChecked
from instseg.errors import ConfigError


def _png(path, image) -> bytes:
    cv2.imwrite(str(path), image)
    return path.read_bytes()


def test_an_image_loads_as_mmcv_loads_it(tmp_path):
    image = np.random.default_rng(0).integers(0, 255, (12, 16, 3), dtype=np.uint8)
    _png(tmp_path / 'a.png', image)
    results = LoadImageChecked()(dict(img_path=str(tmp_path / 'a.png')))
    assert np.array_equal(results['img'], image) and results['ori_shape'] == (12, 16)


@pytest.mark.parametrize('damage, detail', [('truncate', 'truncated or corrupt'), ('delete', 'No such file')])
def test_an_unreadable_image_names_the_file(tmp_path, capfd, damage, detail):
    path = tmp_path / 'a.png'
    data = _png(path, np.zeros((12, 16, 3), np.uint8))
    path.write_bytes(data[:len(data) // 2]) if damage == 'truncate' else path.unlink()
    with pytest.raises(ConfigError) as info:
        LoadImageChecked()(dict(img_path=str(path)))
    message = str(info.value)
    assert message.startswith(f'image {path}: cannot be read or decoded') and detail in message
    assert 'resume=true' in message and '\n' not in message
    assert capfd.readouterr().err == ''  # OpenCV's own warning line held back: the error is the only line


def test_a_truncated_semantic_map_names_the_file(tmp_path):
    path = tmp_path / 'a.png'
    data = _png(path, np.ones((12, 16), np.uint8))
    path.write_bytes(data[:len(data) // 2])
    load = LoadAnnotationsChecked(with_bbox=False, with_label=False, with_seg=True)
    with pytest.raises(ConfigError, match=f'^semantic map {path}: cannot be read or decoded \\(truncated or corrupt\\)'):
        load(dict(seg_map_path=str(path)))


def test_an_error_from_a_dataloader_worker_is_one_line():
    from torch.utils.data._utils import ExceptionWrapper
    try:
        raise ConfigError('image /data/a.png: cannot be read or decoded (truncated or corrupt); replace it')
    except ConfigError:
        wrapped = ExceptionWrapper(where='in DataLoader worker process 0')
    with pytest.raises(ConfigError) as info:
        wrapped.reraise()
    assert '\n' in str(info.value)  # torch's: the worker's traceback around the message
    assert one_line(info.value) == 'image /data/a.png: cannot be read or decoded (truncated or corrupt); replace it'


def test_cached_loading_reads_each_image_once_and_hands_out_copies(tmp_path):
    from instseg.data.transforms import CachedLoading
    path = tmp_path / 'a.png'
    first = np.random.default_rng(0).integers(0, 255, (12, 16, 3), dtype=np.uint8)
    _png(path, first)
    load = CachedLoading([dict(type='LoadImageChecked')])
    results = load(dict(img_path=str(path), sample_idx=0))
    assert np.array_equal(results['img'], first)
    results['img'][:] = 0  # what a later transform does in place
    _png(path, np.zeros_like(first))  # the file changes: the cache is what a second epoch sees
    assert np.array_equal(load(dict(img_path=str(path), sample_idx=0))['img'], first)
    # the same file as another entry of the data set is loaded as its own
    assert not load(dict(img_path=str(path), sample_idx=1))['img'].any()


def test_the_synthetic_set_caches_its_decoded_train_images_and_coco_does_not():
    from instseg.cli import compose
    from instseg.config import to_mmengine

    def first_transform(*overrides):
        mm = to_mmengine(compose('train', ['model=mask_rcnn', 'work_dir=/tmp/unused', *overrides]))
        return mm.train_dataloader.dataset.pipeline[0], mm.val_dataloader.dataset.pipeline[0]

    train, val = first_transform()
    assert train['type'] == 'CachedLoading' and [t['type'] for t in train['transforms']] == [
        'LoadImageChecked', 'LoadAnnotationsChecked']
    assert val['type'] == 'LoadImageChecked'  # read once per evaluation: nothing to gain
    assert first_transform('data.cache_decoded=false')[0]['type'] == 'LoadImageChecked'
    assert first_transform('data=coco', 'data.classes=[a]')[0]['type'] == 'LoadImageChecked'
