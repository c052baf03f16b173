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
