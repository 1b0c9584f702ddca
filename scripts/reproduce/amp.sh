#!/usr/bin/env bash
# AMP, neural network anchoring (Anirudh & Thiagarajan, 2022): CIFAR-10 / CIFAR-100 on the classic OOD sets with a
# WRN-40-2 (dropout 0.3), and the LSUN resizing benchmark with a ResNet-34. Paper settings: configs/amp.yaml with
# preset paper (fp32, as lib/AMP_Training.py): SGD lr 0.1 momentum 0.9 wd 5e-4, batch 128, 200 epochs, lr x0.2 at
# epochs 60/120/160, anchors from the batch, every 5th batch corrupted; K=5 anchors from a pool of 128 at test time,
# the xent score. Runs go to the `paper` run folders.
source "$(dirname "$0")/common.sh"

cat > reports/reproduce/amp_classic.yaml <<YAML
name: amp_classic
report: reports/reproduce/amp_classic
preset: paper
run_name: paper
seeds: [0]
in: [cifar10, cifar100]
out:
  average: [isun, lsun_resize, lsun, places365, textures, svhn]
bootstrap: 1000
methods:
  - {method: amp, label: amp_wrn, overrides: [model.arch=wrn40_2, model.dropout=0.3]}
YAML
oodbench bench reports/reproduce/amp_classic.yaml
# reported (paper, WRN-40-2), AUROC % / FPR95 %:
#   CIFAR-10:  iSUN 97.16/16.59  LSUN-R 97.77/13.73  LSUN-C 99.55/1.50  Places365 95.79/19.89  Textures 93.61/35.43
#              SVHN 98.10/5.19   average 96.99/15.39
#   CIFAR-100: iSUN 83.79/67.15  LSUN-R 85.64/61.73  LSUN-C 99.18/4.16  Places365 85.78/65.18  Textures 71.36/81.81
#              SVHN 97.85/12.57  average 87.27/48.77

# Resizing benchmark: the same LSUN images resized to 32x32 with four PIL filters. Give full-size LSUN images as
# LSUN_SOURCE (a folder, any layout); AMP's own resize_benchmark.tar.gz can be used instead as folder: specs.
LSUN_SOURCE=${LSUN_SOURCE:-$DATA/lsun_full}
cat > reports/reproduce/amp_resize.yaml <<YAML
name: amp_resize
report: reports/reproduce/amp_resize
preset: paper
run_name: paper
seeds: [0]
in: [cifar10]
out:
  average: [resize:nearest:folder:$LSUN_SOURCE, resize:bilinear:folder:$LSUN_SOURCE,
            resize:bicubic:folder:$LSUN_SOURCE, resize:lanczos:folder:$LSUN_SOURCE]
bootstrap: 1000
methods: [amp]
YAML
oodbench bench reports/reproduce/amp_resize.yaml
# reported (paper, ResNet-34, CIFAR-10): average over the four resizings AUROC 98.1 %, FPR95 9.6 %
