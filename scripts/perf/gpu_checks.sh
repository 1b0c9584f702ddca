#!/usr/bin/env bash
# Every GPU check the issues ask for, in one run: what to run when a GPU is lent (about 10 to 11 minutes on one H100).
#
#   ./scripts/perf/gpu_checks.sh [LOG_DIR]        # log: LOG_DIR/gpu_checks.log (default reports/gpu_checks, or $OUT)
#
# - gradients: GradNorm closed form vs OpenOOD's loop and the original per-image loop; per-layer vmap vs loop
#   (issue goals: >= 50x and >= 5x), ResNet-18 and ResNet-20, peak GPU memory of the chosen micro-batch.
# - llr: engine vs bare-loop training steps/s (goal >= 0.9) and log-likelihood images/s, quick and paper networks.
# - msma (bf16 and fp32 scoring), ddpm (bf16 reconstruction), amp (anchored scoring): throughput vs bare forwards.
# - paper smoke (paper_smoke.py): per family (msma, llr, ddpm, amp, gradients) the paper preset's network trained
#   up to 300 steps in fp32 and under bf16 autocast on synthetic images (about 30 s each; steps cut to the budget),
#   then AUROC of both, Spearman of their scores and the fp32 model's bf16-scoring difference. One check per family,
#   so that a slow family cannot cut the others.
# - streamed folders: data.decode=gpu (nvJPEG) vs PIL in CPU workers, and vs ImageFolder + DataLoader.
# - end to end: `oodbench train` + `eval` of a classifier on scikit-learn digits with bf16 autocast (no download).
# - zero-shot CLIP (docs/clip.md), only when CLIP_WEIGHTS=PATH names open_clip ViT-B-16 weights: mcm, glmcm, msp on
#   digits; with CLIP_DATA=ROOT (OpenOOD's ImageNet layout) also ImageNet-1K vs iNaturalist and Textures.
#
# Uses .venv/bin/python when there is one, else python3 (a machine with torch, torchvision, scikit-learn, scipy,
# pyyaml, tqdm and matplotlib installed); the repository is put on PYTHONPATH. Each check is cut at
# CHECK_TIMEOUT seconds (default 150) so one slow check cannot eat the whole lease; the log keeps what ran.
set -uo pipefail
cd "$(dirname "$0")/../.."
PY=${PYTHON:-$([ -x .venv/bin/python ] && echo .venv/bin/python || echo python3)}
LOG_DIR=${1:-${OUT:-reports/gpu_checks}}
DEVICE=${DEVICE:-cuda}
LIMIT=${CHECK_TIMEOUT:-150}
export PYTHONPATH=".${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 OODBENCH_PROGRESS=0
mkdir -p "$LOG_DIR"
RUNS=$(mktemp -d)

check() {
  echo "== $*"
  local start=$SECONDS
  timeout "$LIMIT" "$PY" "$@" 2>&1
  echo "-- exit $? after $((SECONDS - start)) s"
}

{
  date -u
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>&1 || echo "(no nvidia-smi)"
  "$PY" -c "import torch; print('torch', torch.__version__, 'cuda', torch.cuda.is_available())"
  check scripts/perf/bench_gradients.py --device "$DEVICE" --arch resnet18 --n 2048 --loop-n 128 --batch 512
  check scripts/perf/bench_gradients.py --device "$DEVICE" --arch resnet20 --n 4096 --loop-n 256 --batch 512
  check scripts/perf/bench_llr.py --device "$DEVICE" --steps 100 --eval-images 8192
  check scripts/perf/bench_llr.py --device "$DEVICE" --paper --steps 50 --repeats 2 --eval-images 2048
  check scripts/perf/bench_msma.py --device "$DEVICE" --model refinenet --bf16
  check scripts/perf/bench_msma.py --device "$DEVICE" --model refinenet
  check scripts/perf/bench_ddpm.py --device "$DEVICE" --batch 64 --amp bf16
  check scripts/perf/bench_amp.py --device "$DEVICE" --arch resnet20 --batch 512
  for family in msma llr ddpm amp gradients; do
    check scripts/perf/paper_smoke.py --device "$DEVICE" --steps 300 --families "$family"
  done
  check scripts/perf/bench_stream.py --device "$DEVICE" --images 3000 --size 224 --side 400
  check -m oodbench train --method msp --in digits --runs-dir "$RUNS" --device "$DEVICE" \
    --set train.steps=600 --set data.val_fraction=0.1
  check -m oodbench eval --method msp,energy,gradnorm,mahalanobis --in digits --runs-dir "$RUNS" --device "$DEVICE" \
    --out noise:gaussian,vflip:digits
  if [ -n "${CLIP_WEIGHTS:-}" ]; then
    check -m oodbench eval --model "open_clip:ViT-B-16:$CLIP_WEIGHTS" --in digits --out noise:gaussian,vflip:digits \
      --method mcm,glmcm,msp --runs-dir "$RUNS" --device "$DEVICE"
    if [ -n "${CLIP_DATA:-}" ]; then
      check -m oodbench eval --model "open_clip:ViT-B-16:$CLIP_WEIGHTS" --in imagenet --data-root "$CLIP_DATA" \
        --out inaturalist,imagenet_textures --method mcm,glmcm,msp,energy --runs-dir "$RUNS" --device "$DEVICE"
    fi
  fi
  date -u
} 2>&1 | tee "$LOG_DIR/gpu_checks.log"
rm -rf "$RUNS"
