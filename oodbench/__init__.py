"""oodbench: train and benchmark out-of-distribution detectors for images."""

__version__ = "0.1.0"
