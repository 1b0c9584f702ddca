"""Data layer: dataset specs -> ImageSet (uint8 NCHW on the device); device-side transforms. See docs/data.md."""
from oodbench.data import transforms
from oodbench.data.imageset import ImageSet
from oodbench.data.registry import NAMES, check_spec, dataset_status, load, stream_choice, write_resize_benchmark
from oodbench.data.sources import data_root
from oodbench.data.stream import decode_choice, decoder_for
from oodbench.data.split import run_split, train_val_split

__all__ = ["ImageSet", "NAMES", "check_spec", "data_root", "dataset_status", "decode_choice", "decoder_for", "load",
           "run_split", "stream_choice", "train_val_split", "transforms", "write_resize_benchmark"]
