"""Checks on COCO-format annotation files, so bad data fails early with one clear line."""
from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path

from instseg.errors import ConfigError


@lru_cache(maxsize=16)
def _categories(path: str) -> tuple:
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f'annotation file not found: {p}')
    try:
        with open(p) as f:
            content = json.load(f)
    except (OSError, ValueError) as e:
        raise ConfigError(f'{p}: not a readable JSON file ({e})') from None
    missing = [k for k in ('images', 'categories') if k not in content]
    if not isinstance(content, dict) or missing:
        raise ConfigError(f'{p}: not a COCO annotation file (missing {", ".join(missing)})')
    return tuple(c['name'] for c in content['categories'])


def category_names(path) -> list:
    """Category names in the file's order: the order mmdet assigns labels in."""
    return list(_categories(str(path)))


def check_classes(classes, path, field: str) -> None:
    """``classes`` must name categories of ``path`` in the file's order; anything else makes mmdet
    drop or mislabel instances silently (AP 0 or per-class AP under the wrong name)."""
    names = category_names(path)
    unknown = [c for c in classes if c not in names]
    if unknown:
        raise ConfigError(f'{field}: {unknown} not among the categories of {path}: {names}')
    in_file_order = [n for n in names if n in set(classes)]
    if list(classes) != in_file_order:
        raise ConfigError(f'{field}: classes must follow the order of {path}: {in_file_order}')
