"""Data layer: dataset specs -> ImageSet (uint8 NCHW on the device); device-side transforms. See docs/data.md."""
from oodbench.data import transforms
from oodbench.data.adapters import LoaderSet, as_imageset
from oodbench.data.imageset import ImageSet
from oodbench.data.overlap import check_overlap, count_overlap, image_hashes
from oodbench.data.registry import (NAMES, check_spec, dataset_status, has_split, load, stream_choice,
                                    write_resize_benchmark)
from oodbench.data.sources import data_root
from oodbench.data.stream import decode_choice, decoder_for
from oodbench.data.split import run_split, train_val_split

__all__ = ["ImageSet", "LoaderSet", "NAMES", "as_imageset", "check_overlap", "check_spec", "count_overlap", "data_root",
           "dataset_status", "decode_choice", "decoder_for", "has_split", "image_hashes", "load", "run_split",
           "stream_choice", "train_val_split", "transforms", "write_resize_benchmark"]
