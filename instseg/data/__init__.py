"""Data sets: the built-in synthetic generator and checks for user COCO-format data."""
from instseg.data import transforms  # noqa: F401  (registers the checked loading transforms)
