"""Shared test settings: no progress bars; runs never land in the working tree."""
import os

os.environ.setdefault("OODBENCH_PROGRESS", "0")
