#!/usr/bin/env bash
# GradNorm (Huang, Geng, Li, NeurIPS 2021) and the seed's per-layer gradient norms on a CIFAR ResNet-18, with the
# OpenOOD v1.5 near/far protocol (configs/bench/cifar10.yaml, cifar100.yaml groups). The numbers below are
# OpenOOD's, from classifiers trained with crop+flip, input normalisation and wd 5e-4, so this script trains with the
# configs/classifier.yaml defaults (= preset paper-improved: ResNet-18, SGD lr 0.1 momentum 0.9 Nesterov, wd 5e-4,
# 100 epochs, lr x0.1 at epochs 50/75/90, batch 128). The GradNorm seed's own procedure (no augmentation, no
# normalisation, wd 1e-4, all 50k images, fp32) is `preset: paper` in the YAML below (docs/fidelity.md, Gradients).
# OpenOOD averages three training seeds (seeds 0, 1, 2 below). ~1 GPU-hour per run.
source "$(dirname "$0")/common.sh"

for in_set in cifar10 cifar100; do
    other=$([ "$in_set" = cifar10 ] && echo cifar100 || echo cifar10)
    cat > "reports/reproduce/gradnorm_$in_set.yaml" <<YAML
name: gradnorm_$in_set
report: reports/reproduce/gradnorm_$in_set
seeds: [0, 1, 2]
in: [$in_set]
out:
  near: [$other, tinyimagenet]
  far: [mnist, svhn, textures, places365]
bootstrap: 1000
methods: [gradnorm, gradlayer, msp, energy]
YAML
    oodbench bench "reports/reproduce/gradnorm_$in_set.yaml"
done
# reported AUROC % (OpenOOD v1.5 tables, ResNet-18, mean of 3 seeds), near / far:
#   CIFAR-10:  gradnorm 54.90 / 57.55   msp 88.03 / 90.73   energy 87.58 / 91.21
#   CIFAR-100: gradnorm 70.13 / 69.14
# GradNorm is weak on CIFAR ResNet-18: a low number is expected; a mismatch with the autograd reference is a bug.
# GradNorm paper (ImageNet, BiT-S-R101x1, not reproduced here): average FPR95 54.70, AUROC 86.31.
