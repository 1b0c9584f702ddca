"""The training engine: one loop, checkpoints, resume, EMA, autocast, DDP (see docs/architecture.md)."""
from oodbench.engine.loop import Engine, resolve_device, seed_everything, setup_device  # noqa: F401
from oodbench.engine.spec import TrainSpec  # noqa: F401
