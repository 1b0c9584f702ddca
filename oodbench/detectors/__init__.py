"""Detector registry: importing a module here registers its methods (one line per detector module)."""
from oodbench.detectors.base import REGISTRY, Detector, get, register  # noqa: F401
from oodbench.detectors import classifier  # noqa: F401,E402  msp, maxlogit, energy, odin
