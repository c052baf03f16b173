"""Data sets: the built-in synthetic generator and checks for user COCO-format data."""
