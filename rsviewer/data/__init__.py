"""Data layer: image files and caption datasets (numpy/Pillow only, no torch, no Qt)."""
from .datasets import DATASET_FORMATS, Dataset, Item, load_dataset
from .images import (
    DEFAULT_MAX_PIXELS,
    IMAGE_EXTENSIONS,
    image_size,
    is_image_file,
    load_image,
    max_pixels,
    read_hint,
    stretch_to_uint8,
)

__all__ = [
    "DATASET_FORMATS",
    "DEFAULT_MAX_PIXELS",
    "IMAGE_EXTENSIONS",
    "Dataset",
    "Item",
    "image_size",
    "is_image_file",
    "read_hint",
    "load_dataset",
    "load_image",
    "max_pixels",
    "stretch_to_uint8",
]
