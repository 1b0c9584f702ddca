"""Shared test settings: no progress bars, one intra-op thread (tiny networks run fastest on one thread, and a second
thread only spins on a busy 2-core machine)."""
import os

import pytest
import torch
from threadpoolctl import threadpool_limits

os.environ.setdefault("OODBENCH_PROGRESS", "0")


@pytest.fixture(autouse=True, scope="session")
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    with threadpool_limits(1):
        yield
    torch.set_num_threads(before)


def fails(capsys, args) -> str:
    """Run the CLI; it must exit 2 with one error line on stderr and no traceback. Returns that line."""
    from oodbench.cli import main

    capsys.readouterr()
    assert main(args) == 2
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("oodbench: error:")]
    assert len(errors) == 1 and "Traceback" not in err, err
    assert all(line.startswith("oodbench: ") and "warning" not in line for line in err.splitlines()), err
    return errors[0]


def tiny_image_batch(n: int, seed: int) -> torch.Tensor:
    """n uint8 8×8 RGB images: one random tint per image plus ±40 of noise (the post-hoc tests' inputs)."""
    g = torch.Generator().manual_seed(seed)
    tint = torch.randint(0, 256, (n, 3, 1, 1), generator=g)
    noise = torch.randint(-40, 41, (n, 3, 8, 8), generator=g)
    return (tint + noise).clamp(0, 255).to(torch.uint8)


@pytest.fixture(scope="session")
def tiny_images():
    """`tiny_images(n, seed)`: the small seeded images the post-hoc method tests score."""
    return tiny_image_batch
