"""The paper presets train at the released code's precision, and the shipped paper protocols (bench configs,
scripts/reproduce) run every family at `--preset paper` (issue 30)."""
from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

from oodbench import bench
from oodbench.bench.plan import run_job
from oodbench.config import load_config
from oodbench.detectors.ddpm import DDPM
from oodbench.engine import Engine, TrainSpec, precision
from oodbench.errors import OODBenchError
from oodbench.nets.pixelcnnpp import PixelCNNpp

REPO = Path(__file__).resolve().parents[1]

# kind: (the released code's training precision as a train.amp value, where it is read)
RELEASED_PRECISION = {
    "msma": "off",         # paper-era train.py (256569c): no mixed-precision policy
    "ddpm": "fp16",        # ddpm-ood trainers: torch.cuda.amp autocast + GradScaler
    "amp": "off",          # LLNL/AMP lib/AMP_Training.py: plain fp32 loop
    "classifier": "off",   # the GradNorm seed names no autocast: PyTorch's fp32
}


@pytest.mark.parametrize("kind", sorted(RELEASED_PRECISION))
def test_paper_presets_train_at_the_released_precision(kind):
    paper, default = load_config(kind, preset="paper"), load_config(kind)
    assert paper["train"]["amp"] == RELEASED_PRECISION[kind]
    assert default["train"]["amp"] == "auto"
    assert load_config(kind, preset="paper-improved") == default


def test_ddpm_paper_preset_reconstructs_under_fp16_autocast():
    """reconstruct.py runs the UNet and PNDM steps inside torch.cuda.amp.autocast (fp16)."""
    assert load_config("ddpm", preset="paper")["ddpm"]["amp"] == "fp16"
    assert load_config("ddpm")["ddpm"]["amp"] == "auto"
    with pytest.raises(OODBenchError, match="ddpm.amp"):
        DDPM(load_config("ddpm", overrides=["ddpm.amp=fp8"]))


def test_fp16_is_torch_cuda_amp_and_a_no_op_off_cuda(tmp_path):
    """fp16 = `torch.cuda.amp.autocast` as the originals use it: CUDA only (fp32 on a CPU); bf16 works anywhere."""
    cpu = torch.device("cpu")
    a = torch.randn(4, 4)
    for amp, dtype in (("off", torch.float32), ("auto", torch.float32), ("fp16", torch.float32),
                       ("bf16", torch.bfloat16)):
        with precision.autocast(cpu, amp):
            assert (a @ a).dtype == dtype, amp
    engine = Engine(run_dir=tmp_path, device="cpu", seed=0)                 # training takes the same rule
    for amp, dtype in (("fp16", torch.float32), ("bf16", torch.bfloat16)):
        with engine.autocast(amp):
            assert (a @ a).dtype == dtype, amp
    # `--set train.amp=off` is the string off (YAML 1.2 booleans), for training and for ddpm.amp
    assert TrainSpec.from_cfg(load_config("msma", overrides=["train.amp=off"])["train"]).amp == "off"
    assert DDPM(load_config("ddpm", overrides=["ddpm.amp=off"]))._autocast().__class__.__name__ == "nullcontext"


def test_llr_network_runs_in_fp32_under_any_autocast():
    """LLR: the released TensorFlow code is fp32; PixelCNN++ turns autocast off inside, so train.amp has no effect."""
    torch.manual_seed(0)
    net = PixelCNNpp(in_channels=1, num_filters=8, num_resnet=1, num_hierarchies=2).eval()
    x = torch.randint(0, 256, (2, 1, 8, 8)).float()
    with torch.no_grad():
        plain = net.log_prob_per_pixel(x)
        with precision.autocast(torch.device("cpu"), "bf16"):
            under_bf16 = net.log_prob_per_pixel(x)
    assert under_bf16.dtype == torch.float32 and torch.equal(plain, under_bf16)


@pytest.mark.parametrize("name", ["classic", "fashion_mnist"])
def test_shipped_paper_benches_train_every_run_at_the_paper_preset(name):
    b = bench.load_bench(name)
    assert b.preset == "paper" and b.run_name == "paper"
    jobs = {run_job(b, e, b.ins[0], b.seeds[0]) for e in b.entries if not e.error}
    assert {j.kind for j in jobs} >= ({"classifier", "amp"} if name == "classic" else {"llr", "ddpm", "msma"})
    for job in jobs:
        assert job.preset == "paper", job
        load_config(job.kind, job.preset, job.overrides)       # every family has the preset


def test_reproduce_scripts_train_at_the_paper_preset():
    """Every `oodbench train` in the paper scripts names --preset paper; the bench YAMLs they write say so too."""
    for script in ("msma", "llr", "ddpm"):
        text = (REPO / "scripts" / "reproduce" / f"{script}.sh").read_text().replace("\\\n", " ")
        trains = [line for line in text.splitlines() if line.startswith("oodbench train")]
        evals = [line for line in text.splitlines() if line.startswith("oodbench eval")]
        assert trains and all("--preset paper" in t and "--run-name paper" in t for t in trains), script
        assert evals and all("--run-name paper" in e for e in evals), script
    amp = (REPO / "scripts" / "reproduce" / "amp.sh").read_text()
    yamls = re.findall(r"<<YAML\n(.*?)\nYAML", amp, flags=re.S)
    assert len(yamls) == 2 and all("\npreset: paper\n" in y and "\nrun_name: paper\n" in y for y in yamls)
