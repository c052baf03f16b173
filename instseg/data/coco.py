"""Checks on COCO-format annotation files, so bad data fails early with one clear line."""
from __future__ import annotations

import json
from collections import Counter
from functools import lru_cache
from pathlib import Path

from instseg.errors import ConfigError


def load_annotation_file(path) -> dict:
    """The parsed file, parsed once for the class names (config time) and the validator (before
    training): COCO's train file takes ~20 s and GBs. Callers must not modify it; the runner frees
    it with ``release_annotation_files()`` once the data is checked (mmdet parses its own copy)."""
    p = Path(path)
    if not p.is_file():
        missing = next((d for d in reversed(p.parents) if not d.exists()), None)
        raise ConfigError(f'annotation file not found: {p}' + (f' ({missing} does not exist)' if missing else ''))
    stat = p.stat()
    return _parse(str(p), stat.st_mtime_ns, stat.st_size)  # a rewritten file is parsed again


@lru_cache(maxsize=1)  # one file at a time: train and val files are seldom both needed at once
def _parse(path: str, _mtime_ns: int, _size: int) -> dict:
    try:
        with open(path, 'rb') as f:  # bytes: json detects UTF-8/16/32 itself
            content = json.load(f)
    except (OSError, ValueError) as e:  # ValueError: malformed or truncated JSON, bad encoding
        raise ConfigError(f'{path}: not a readable JSON file ({e})') from None
    if not isinstance(content, dict):
        raise ConfigError(f'{path}: not a COCO annotation file (a JSON {type(content).__name__}, '
                          'not an object with images, annotations and categories)')
    return content


def release_annotation_files() -> None:
    _parse.cache_clear()


@lru_cache(maxsize=16)
def _categories(path: str) -> tuple:
    content = load_annotation_file(path)
    missing = [k for k in ('images', 'categories') if k not in content]
    if missing:
        raise ConfigError(f'{path}: not a COCO annotation file (missing {", ".join(missing)})')
    categories = content['categories']
    if not isinstance(categories, list) or not categories:
        raise ConfigError(f'{path}: categories must be a non-empty list of {{"id": ..., "name": ...}}')
    for i, c in enumerate(categories):
        if not (isinstance(c, dict) and type(c.get('id')) is int and isinstance(c.get('name'), str)):
            raise ConfigError(f'{path}: category #{i} ({json.dumps(c)[:80]}) needs an integer id and a name')
    for key in ('id', 'name'):
        repeated = sorted((v for v, n in Counter(c[key] for c in categories).items() if n > 1), key=str)
        if repeated:
            raise ConfigError(f'{path}: category {key}s must be unique; repeated: {repeated}')
    return tuple(c['name'] for c in categories)


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
