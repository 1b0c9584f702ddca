#!/usr/bin/env bash
# OpenOOD v1.5's CIFAR-10 table from fetched data and OpenOOD's own checkpoints, on one GPU: every classifier
# method that its leaderboard lists and oodbench has (oodbench/leaderboard.py), scored on the three published
# ResNet-18 runs (openood:cifar10_res18 = s0, s1, s2 for seeds 0, 1, 2), near-OOD = CIFAR-100, TinyImageNet,
# far-OOD = MNIST, SVHN, Textures, Places365. Each method with its OpenOOD default options (no automatic parameter
# search: OpenOOD's CIFAR validation OOD list is not fetched here).
# report.md then holds a "Leaderboard" table per ID set (ours, the leaderboard's, the difference, ⚠ above 1 point) and
# openood.csv the leaderboard's CSV schema.
#
# Run time: not measured yet (no GPU run of the full grid has been made with the real data); the fetch step is
# ~3 GB of downloads (Places365's full test_256 set is most of it).
#
# Known differences to expect: tinyimagenet, textures and places365 are oodbench's image-folder sets here (the ODIN
# release of TinyImageNet, the full DTD, the full Places365 test set), not OpenOOD's filtered image lists
# (benchmark_imglist/cifar10/test_{tin,texture,places365}.txt), so near/far means can differ by more than a point.
source "$(dirname "$0")/common.sh"

"$PYTHON" -m oodbench data fetch cifar10 cifar10_res18_v1.5 --data-root "$DATA"    # the protocol's sets + checkpoints
"$PYTHON" -m oodbench data verify --data-root "$DATA"
"$PYTHON" -m oodbench models list --data-root "$DATA"

methods="msp maxlogit energy odin tempscale gen klm mahalanobis rmds knn vim she react ash_b scale dice gradnorm nci
fdbd openmax rankfeat gram mds_ensemble adascale_a adascale_l relation iodin"
{
    cat <<YAML
name: openood_cifar10
report: reports/reproduce/openood_cifar10
seeds: [0, 1, 2]
in: [cifar10]
out:
  near: [cifar100, tinyimagenet]
  far: [mnist, svhn, textures, places365]
bootstrap: 1000
methods:
YAML
    for m in $methods; do echo "  - {method: $m, model: openood:cifar10_res18}"; done
} > reports/reproduce/openood_cifar10.yaml
oodbench bench reports/reproduce/openood_cifar10.yaml --export openood-csv
