"""Loading that fails in one line: an image (or semantic map) that cannot be read or decoded mid-run;
loading once per image for small data sets (``CachedLoading``).

validate.py decodes only a sample of the image files before a run; a file truncated or corrupt beyond
that sample (a copy cut short, a bad disk) otherwise stops training hours in with mmcv's bare
``AssertionError: failed to load image`` under a long traceback (a missing or truncated PNG decodes to
None). These raise ``ConfigError`` naming the file, which the tools print as one line; the checkpoints
saved so far stay in the work_dir for ``resume=true``. OpenCV's own warning about the file (printed
from C before the decode returns None) is held back while they load, so that line is the only one.
"""
import copy
from contextlib import contextmanager
from typing import Dict, List

from cv2.utils import logging as cv2_logging
from mmcv.transforms import BaseTransform, Compose, LoadImageFromFile
from mmdet.datasets.transforms import LoadAnnotations

from instseg.errors import ConfigError
from instseg.registry import TRANSFORMS


def _unreadable(kind: str, path: str, error: Exception) -> ConfigError:
    if isinstance(error, (AssertionError, AttributeError)):  # decoded to None (mmcv asserts, mmdet squeezes it)
        detail = 'truncated or corrupt'
    else:
        detail = str(error).strip().splitlines()[-1] if str(error).strip() else type(error).__name__
    return ConfigError(f'{kind} {path}: cannot be read or decoded ({detail}); replace the file, or take its '
                       'image out of the annotation file, then resume=true goes on from the last checkpoint')


@contextmanager
def _opencv_errors_only():
    level = cv2_logging.getLogLevel()
    cv2_logging.setLogLevel(cv2_logging.LOG_LEVEL_ERROR)
    try:
        yield
    finally:
        cv2_logging.setLogLevel(level)


@TRANSFORMS.register_module()
class LoadImageChecked(LoadImageFromFile):
    """mmcv's LoadImageFromFile; a file it cannot read or decode raises one line naming it."""

    def transform(self, results: dict) -> dict:
        try:
            with _opencv_errors_only():
                return super().transform(results)
        except Exception as e:  # noqa: BLE001 - OSError, cv2.error, mmcv's assert on None: all the file's
            raise _unreadable('image', results['img_path'], e) from None


@TRANSFORMS.register_module()
class LoadAnnotationsChecked(LoadAnnotations):
    """mmdet's LoadAnnotations; a semantic map it cannot read or decode raises one line naming it."""

    def _load_seg_map(self, results: dict) -> None:
        try:
            with _opencv_errors_only():
                super()._load_seg_map(results)
        except Exception as e:  # noqa: BLE001 - a None decode fails in .squeeze(): the file's fault too
            raise _unreadable('semantic map', results['seg_map_path'], e) from None


@TRANSFORMS.register_module()
class CachedLoading(BaseTransform):
    """``transforms`` (the loading of an image and its annotations) run once per image file, their result
    kept in memory and a copy of it returned every later epoch (``data.cache_decoded``). For small data sets
    read many times: on the synthetic set reading and decoding was ~8 % of a K-Net CPU iteration. Loading
    draws no random numbers, so a run is the same with the cache as without, bit for bit; the random
    transforms after it run every time. Each data-loader worker process keeps a cache of its own."""

    def __init__(self, transforms: List[dict]) -> None:
        self.transforms = Compose([TRANSFORMS.build(t) if isinstance(t, dict) else t for t in transforms])
        self._cache: Dict[tuple, dict] = {}

    def transform(self, results: dict) -> dict:
        key = (results['img_path'], results.get('sample_idx'))  # one file listed twice: two entries
        if key not in self._cache:
            self._cache[key] = self.transforms(results)
        return copy.deepcopy(self._cache[key])  # the transforms after this one change it in place
