"""Detector registry: importing a module here registers its methods (one line per detector module)."""
from oodbench.detectors.base import REGISTRY, Detector, get, register  # noqa: F401
