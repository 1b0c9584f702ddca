"""Benchmark: every post-hoc method of oodbench in one process, against its floor and against pytorch-ood 0.4.

One model (torchvision ResNet-18, random weights: `torchvision:resnet18:none`), on the CPU, on seeded 3x32x32 uint8
images: `--fit N` labelled fit images (10 classes; the Evaluator holds 10% out as its validation split) and
`--test N` images in each of the three scored sets (an ID test set drawn like the fit set but distinct from it, and
two OOD sets `a` and `b` drawn from two other distributions). Three measurements, in one run:

1. oodbench: `Evaluator(model, methods=[every post-hoc method but gradlayer], fit=(images, labels))
   .evaluate(id_test=..., ood={"a": ..., "b": ...})`, in memory, timed end to end after clearing the process's
   output memo. gradlayer is left out: it takes per-sample gradients of every weight tensor, a cost of its own
   (scripts/perf/bench_gradients.py). Then each method alone through the same Evaluator with only the shared
   features/logits memoised ("alone" below): its own passes, fit, scoring and metrics.
2. The floor: a bare `net(prepare(x))` under torch.no_grad over the fit and the three test sets, in oodbench's
   batch sizes (500 for the fit pass, 256 for scoring), plus the methods' own arithmetic: `fit_features` /
   `score_features` on precomputed arrays for the array-level methods, and for the methods that make passes of their
   own by design (odin: forward+backward+forward; mds_ensemble: a noise step per layer; rankfeat: two edited
   forwards; gram: intermediate maps) their time alone through oodbench. floor = forward + arithmetic + those.
   The forward is the best of 3 runs and each method's arithmetic the best of 2 (a low floor is the strict one).
3. pytorch-ood: each equivalent detector on its own, as its documentation shows (`Detector(...)`, `.fit(loader)`
   where it fits, then `detector(x)` per test batch of a DataLoader), so each re-runs the network. It gets the
   already-normalised float images (`model.prepare(x)`, made once, outside the timing) and the same train / validation
   split; detectors that need no gradient run under torch.no_grad. A detector that cannot be built or fails is
   printed with its reason and left out of the shared set. Then oodbench again, on the shared methods only, end to
   end, for the ratio. pytorch-ood's MultiMahalanobis (mds_ensemble without its noise step, so not shared) is
   timed with --multi-mahalanobis.

Goals: oodbench / floor <= 1.5; pytorch-ood / oodbench >= 5 on the shared methods. The per-method table says where
the time goes ("x fwd" = the method's own time in bare forward passes over the three test sets).

    .venv/bin/python scripts/perf/bench_methods.py [--fit 2000] [--test 1000] [--threads N] [--quick] [--seed 0]
                                                   [--multi-mahalanobis]

On a shared machine the numbers move with the load: the load average is printed before and after.
"""
from __future__ import annotations

import argparse
import logging
import os
import time

import torch
import torch.nn as nn
from torch.utils.data import DataLoader, TensorDataset

import oodbench
from oodbench.detectors import REGISTRY, PostHoc
from oodbench.detectors.posthoc import SET_OUTPUTS
from timing import timed

SPEC = "torchvision:resnet18:none"
ID_CLASSES = 10
FIT_BATCH, SCORE_BATCH = 500, 256          # oodbench's reference pass and scoring batch sizes
SKIPPED = {"gradlayer": "per-sample gradients of every weight tensor (scripts/perf/bench_gradients.py)"}
SHARED_KEYS = ("features+logits", "logits")  # memo entries every method shares (the rest are a method's own)


def post_hoc_methods() -> list:
    return sorted(name for name, cls in REGISTRY.items()
                  if isinstance(cls, type) and issubclass(cls, PostHoc) and cls.kind == "classifier"
                  and name not in SKIPPED)


def make_sets(fit: int, test: int, seed: int):
    """(fit images, fit labels, ID test, OOD a, OOD b): uint8 (N, 3, 32, 32). Fit and ID test are uniform noise (no
    two images alike), a is low-contrast Gaussian noise around grey, b is dark, skewed noise."""
    g = torch.Generator().manual_seed(seed)
    uniform = torch.randint(0, 256, (fit + test, 3, 32, 32), generator=g, dtype=torch.uint8)
    labels = torch.randint(0, ID_CLASSES, (fit,), generator=g)
    labels[:ID_CLASSES] = torch.arange(ID_CLASSES)      # every class present (pytorch-ood asserts it)
    a = (128 + 30 * torch.randn(test, 3, 32, 32, generator=g)).round().clamp(0, 255).to(torch.uint8)
    b = (255 * torch.rand(test, 3, 32, 32, generator=g) ** 3).round().to(torch.uint8)
    return uniform[:fit], labels, uniform[fit:], a, b


def clear_memo(keep_shared: dict | None = None) -> None:
    SET_OUTPUTS.items.clear()
    for key, value in (keep_shared or {}).items():
        SET_OUTPUTS.items[key] = value


def shared_entries() -> dict:
    return {k: v for k, v in SET_OUTPUTS.items.items() if len(k) > 3 and k[3] in SHARED_KEYS}


# ---------------------------------------------------------------------------------------------------- the floor
@torch.no_grad()
def bare_forward(model, images: torch.Tensor, batch: int) -> None:
    for i in range(0, len(images), batch):
        model.net(model.prepare(images[i:i + batch]))


@torch.no_grad()
def arrays_of(model, images: torch.Tensor, batch: int) -> tuple:
    parts = [model.features_and_logits(images[i:i + batch]) for i in range(0, len(images), batch)]
    return torch.cat([f for f, _ in parts]), torch.cat([z for _, z in parts])


def best(fn, repeats: int) -> float:
    return min(timed(fn)[0] for _ in range(repeats))


def arithmetic(name: str, options: dict, model, train: tuple, val: tuple, tests: list) -> float:
    """Seconds (best of 2) of `fit_features` (on the split the method fits on) + `score_features` on each set."""
    method = oodbench.method(name, **options).use_model(model)
    source = {"train": train, "val": val, None: train}[method.fit_on]

    def run():
        method.fit_features(*source)
        return [method.score_features(f, z) for f, z in tests]

    return best(run, 2)


# ---------------------------------------------------------------------------------------------------- pytorch-ood
class Take(nn.Module):
    """The first `n` logits: a head restricted to the ID classes (oodbench's gram does the same, logits[:, classes])."""

    def __init__(self, n: int):
        super().__init__()
        self.n = n

    def forward(self, x):
        return x[:, : self.n]


def pytorch_ood_detectors(net, std, multi_mahalanobis: bool = False) -> dict:
    """{oodbench method: (pytorch-ood class name, factory)} with oodbench's default options where both have them."""
    from pytorch_ood import detector as D

    stem = nn.Sequential(net.conv1, net.bn1, net.relu)
    blocks = [stem, nn.Sequential(net.maxpool, net.layer1), net.layer2, net.layer3, net.layer4]  # oodbench's layers
    encoder = nn.Sequential(*blocks, net.avgpool, nn.Flatten())           # penultimate features (B, 512)
    pooled = nn.Sequential(encoder, nn.Unflatten(1, (net.fc.in_features, 1, 1)))   # oodbench shapes pooled features
    fc_head = nn.Sequential(nn.Flatten(), net.fc)
    w, b = net.fc.weight.detach(), net.fc.bias.detach()
    detectors = {
        "msp": ("MaxSoftmax", lambda: D.MaxSoftmax(net)),
        "maxlogit": ("MaxLogit", lambda: D.MaxLogit(net)),
        "energy": ("EnergyBased", lambda: D.EnergyBased(net)),
        "entropy": ("Entropy", lambda: D.Entropy(net)),
        "gen": ("GEN", lambda: D.GEN(net, gamma=0.1, M=100)),
        "tempscale": ("TemperatureScaling", lambda: D.TemperatureScaling(net)),
        "klm": ("KLMatching", lambda: D.KLMatching(net)),
        "openmax": ("OpenMax", lambda: D.OpenMax(net, tailsize=20, alpha=3)),
        "odin": ("ODIN", lambda: D.ODIN(net, eps=0.0014, temperature=1000.0, norm_std=list(std))),
        "gradnorm": ("GradNorm", lambda: D.GradNorm(net, param_filter=lambda n: n == "fc.weight")),
        "mahalanobis": ("Mahalanobis", lambda: D.Mahalanobis(encoder)),
        "rmds": ("RMD", lambda: D.RMD(encoder)),
        "knn": ("KNN", lambda: D.KNN(encoder, k=50)),
        "vim": ("ViM", lambda: D.ViM(encoder, d=256, w=w, b=b)),
        "she": ("SHE", lambda: D.SHE(encoder, nn.Sequential(net.fc, Take(ID_CLASSES)))),
        "nnguide": ("NNGuide", lambda: D.NNGuide(encoder, net.fc, k=100)),
        "nci": ("NCI", lambda: D.NCI(encoder, net.fc, alpha=0.0001)),
        "fdbd": ("fDBD", lambda: D.fDBD(encoder, net.fc)),
        "dice": ("DICE", lambda: D.DICE(encoder, w=w, b=b, p=0.9)),
        "react": ("ReAct", lambda: D.ReAct(pooled, fc_head, percentile=0.9)),
        "ash_p": ("ASH ash-p", lambda: D.ASH(pooled, fc_head, variant="ash-p", percentile=0.9)),
        "ash_b": ("ASH ash-b", lambda: D.ASH(pooled, fc_head, variant="ash-b", percentile=0.9)),
        "ash_s": ("ASH ash-s", lambda: D.ASH(pooled, fc_head, variant="ash-s", percentile=0.9)),
        "scale": ("SCALE", lambda: D.SCALE(pooled, fc_head, percentile=0.85)),
        "rankfeat": ("RankFeat", lambda: D.RankFeat(nn.Sequential(*blocks),
                                                    nn.Sequential(net.avgpool, nn.Flatten(), net.fc))),
        "gram": ("Gram", lambda: D.Gram(nn.Sequential(net.avgpool, nn.Flatten(), net.fc, Take(ID_CLASSES)), blocks,
                                        num_classes=ID_CLASSES, num_poles_list=[1, 2, 3, 4, 5])),
    }
    if multi_mahalanobis:   # not oodbench's mds_ensemble: that one takes a noise step per layer (noise 0.0014) first
        detectors["(mds_ensemble)"] = ("MultiMahalanobis", lambda: D.MultiMahalanobis(blocks))
    return detectors


NOT_EQUIVALENT = {"(mds_ensemble)": "mds_ensemble adds a noise step per layer, MultiMahalanobis none"}
FIT_ON_VAL = {"tempscale", "klm"}          # fitted on the validation split, as oodbench does
NEEDS_GRAD = {"odin", "gradnorm"}


def run_pytorch_ood(factory, needs_grad: bool, fit_loader, test_loaders) -> tuple:
    """(fit seconds, score seconds) of one detector: built, fitted on the loader, then called per test batch."""
    def fit():
        det = factory()
        det.fit(fit_loader)
        return det

    t_fit, det = timed(fit)

    def score():
        with torch.enable_grad() if needs_grad else torch.no_grad():
            return [torch.cat([det(x) for (x,) in loader]) for loader in test_loaders]

    t_score, scores = timed(score)
    if any(not torch.isfinite(torch.as_tensor(s, dtype=torch.float64)).any() for s in scores):
        raise RuntimeError("no finite score")
    return t_fit, t_score


# ---------------------------------------------------------------------------------------------------- main
def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fit", type=int, default=2000, help="fit images (10%% become the validation split)")
    parser.add_argument("--test", type=int, default=1000, help="images in each of the ID test set and OOD sets a, b")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: as it is)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true", help="a smoke run: 300 fit, 200 test images")
    parser.add_argument("--multi-mahalanobis", action="store_true",
                        help="also time pytorch-ood's MultiMahalanobis (not shared: no noise step)")
    args = parser.parse_args()
    if args.quick:
        args.fit, args.test = 300, 200
    if args.threads:
        torch.set_num_threads(args.threads)
    logging.getLogger("pytorch_ood").setLevel(logging.ERROR)   # "No device set. Will use 'cpu'." per fit
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, load average "
          f"{' '.join(f'{v:.2f}' for v in os.getloadavg())}; {SPEC} on the CPU; fit {args.fit}, test "
          f"{args.test} x 3 sets (ID test, OOD a, OOD b), 3x32x32 uint8")

    fit_x, fit_y, id_x, a_x, b_x = make_sets(args.fit, args.test, args.seed)
    tests = [id_x, a_x, b_x]
    model = oodbench.load_model(SPEC)
    methods = post_hoc_methods()
    overrides = []
    if int(args.fit * 0.9) < REGISTRY["knn"].defaults()["k"]:
        overrides.append(f"knn.k={max(1, int(args.fit * 0.9))}")
    bare_forward(model, fit_x[:SCORE_BATCH], SCORE_BATCH)   # warm-up (allocator, kernels), not timed
    print(f"methods ({len(methods)}): {', '.join(methods)}")
    print(f"left out: {'; '.join(f'{k}: {v}' for k, v in SKIPPED.items())}"
          + (f"; overrides: {', '.join(overrides)}" if overrides else ""))

    # 1. oodbench, every method, end to end ------------------------------------------------------------------
    clear_memo()
    ood = {"a": a_x, "b": b_x}

    def evaluate_all():
        ev = oodbench.Evaluator(model, methods=methods, fit=(fit_x, fit_y), overrides=overrides)
        return ev, ev.evaluate(id_test=id_x, ood=ood)

    passed = [0]   # images through the network (a forward hook: one Python call per batch)
    hook = model.net.register_forward_hook(lambda _m, inputs, _o: passed.__setitem__(0, passed[0] + len(inputs[0])))
    t_all, (ev, rows) = timed(evaluate_all)
    hook.remove()
    everything = args.fit + 3 * args.test
    print(f"\n1. oodbench Evaluator, {len(methods)} methods, {len(rows)} rows: {t_all:.2f} s; {passed[0]} images "
          f"through the network = {passed[0] / everything:.1f} x (fit + 3 test sets)")

    shared = shared_entries()
    run = ev.run_for(id_x)
    cfg = run.scoring_config(overrides)
    train, val = run.fit_splits(cfg, torch.device("cpu"))
    sets = {name: oodbench.as_imageset(x, name=name) for name, x in ood.items()}
    alone = {}
    for name in methods:     # each method alone: only the shared features/logits memoised
        clear_memo(shared)
        ev.methods = [name]
        alone[name] = timed(lambda: ev.evaluate(id_test=id_x, ood=sets))[0]

    # 2. the floor ---------------------------------------------------------------------------------------------
    def forward_all():
        bare_forward(model, fit_x, FIT_BATCH)
        for x in tests:
            bare_forward(model, x, SCORE_BATCH)

    t_forward = best(forward_all, 3)
    t_forward_tests = best(lambda: [bare_forward(model, x, SCORE_BATCH) for x in tests], 3)
    tr = (*arrays_of(model, train.images, FIT_BATCH), train.labels)
    va = (*arrays_of(model, val.images, FIT_BATCH), val.labels)
    test_arrays = [arrays_of(model, x, SCORE_BATCH) for x in tests]
    arith, own_passes = {}, {}
    for name in methods:
        if REGISTRY[name].array_level:
            arith[name] = arithmetic(name, cfg.get(name, {}), model, tr, va, test_arrays)
        else:
            own_passes[name] = alone[name]
    floor = t_forward + sum(arith.values()) + sum(own_passes.values())
    print(f"2. floor: bare forward {t_forward:.2f} s (fit {args.fit} + 3 x {args.test}; the three test sets alone "
          f"{t_forward_tests:.2f} s) + array arithmetic {sum(arith.values()):.2f} s ({len(arith)} methods) + "
          f"own passes {sum(own_passes.values()):.2f} s ({', '.join(own_passes)}) = {floor:.2f} s")
    overhead = t_all - t_forward - sum(alone.values())
    print(f"   oodbench {t_all:.2f} s = forward {t_forward:.2f} + methods alone {sum(alone.values()):.2f} + "
          f"the rest (one-off checks, data, memo) {overhead:.2f} s")

    # 3. pytorch-ood, one detector at a time -------------------------------------------------------------------
    import pytorch_ood

    with torch.no_grad():
        prep = lambda x: torch.cat([model.prepare(x[i:i + SCORE_BATCH]) for i in range(0, len(x), SCORE_BATCH)])  # noqa: E731
        fit_loader = DataLoader(TensorDataset(prep(train.images), train.labels), batch_size=FIT_BATCH)
        val_loader = DataLoader(TensorDataset(prep(val.images), val.labels), batch_size=FIT_BATCH)
        test_loaders = [DataLoader(TensorDataset(prep(x)), batch_size=SCORE_BATCH) for x in tests]
    print(f"\n3. pytorch-ood {pytorch_ood.__version__}, each detector on its own (fit on {len(train)} train / "
          f"{len(val)} val images, scored on 3 x {args.test}):")
    theirs, failed = {}, {}
    detectors = pytorch_ood_detectors(model.net, model.std, args.multi_mahalanobis)
    for name, (label, factory) in detectors.items():
        loader = val_loader if name in FIT_ON_VAL else fit_loader
        try:
            t_fit, t_score = run_pytorch_ood(factory, name in NEEDS_GRAD, loader, test_loaders)
        except Exception as e:  # noqa: BLE001 - reported, and the detector leaves the shared set
            first = (str(e).strip().splitlines() or [""])[0][:160]
            failed[name] = f"{label}: {type(e).__name__}: {first}"
            print(f"   {label:20s} FAILED ({type(e).__name__}: {first}); left out")
            continue
        theirs[name] = t_fit + t_score
        note = f"  (not shared: {NOT_EQUIVALENT[name]})" if name in NOT_EQUIVALENT else ""
        print(f"   {label:20s} fit {t_fit:6.2f} s  score {t_score:6.2f} s  total {t_fit + t_score:6.2f} s{note}")
    common = [m for m in methods if m in theirs]
    t_theirs = sum(theirs[m] for m in common)
    print(f"   total on the {len(common)} shared methods: {t_theirs:.2f} s"
          + (f"; all detectors timed: {sum(theirs.values()):.2f} s" if len(theirs) != len(common) else ""))

    clear_memo()
    t_ours_common = timed(lambda: oodbench.Evaluator(model, methods=common, fit=(fit_x, fit_y), overrides=overrides)
                          .evaluate(id_test=id_x, ood=ood))[0]
    print(f"   oodbench on the same {len(common)} methods, end to end: {t_ours_common:.2f} s")

    # the table -------------------------------------------------------------------------------------------------
    print("\nper method (seconds): alone = through oodbench with the shared outputs memoised (own passes, fit, "
          "scoring, metrics);\n  arithmetic = fit_features + score_features on arrays; x fwd = alone / bare forward "
          "over the 3 test sets")
    print(f"   {'method':14s} {'alone':>7s} {'arith':>7s} {'x fwd':>6s} {'pytorch-ood':>12s}")
    for name in methods:
        ar = f"{arith[name]:7.3f}" if name in arith else f"{'-':>7s}"
        po = f"{theirs[name]:12.2f}" if name in theirs else f"{'-':>12s}"
        print(f"   {name:14s} {alone[name]:7.3f} {ar} {alone[name] / t_forward_tests:6.2f} {po}")
    print(f"   {'(forward)':14s} {t_forward:7.3f}")
    if "(mds_ensemble)" in theirs:
        print(f"   pytorch-ood MultiMahalanobis (no noise step, not shared): {theirs['(mds_ensemble)']:.2f} s")
    print(f"   not in pytorch-ood: {', '.join(m for m in methods if m not in detectors and m != 'mds_ensemble')}, "
          f"mds_ensemble (MultiMahalanobis has no noise step)"
          + (f"; failed there: {'; '.join(failed.values())}" if failed else ""))

    ratio_floor = t_all / floor
    ratio_theirs = t_theirs / t_ours_common
    print(f"\nload average now {' '.join(f'{v:.2f}' for v in os.getloadavg())}")
    print(f"oodbench / forward: {t_all / t_forward:.2f}x ({t_all:.2f} s / {t_forward:.2f} s)")
    print(f"oodbench vs floor: {ratio_floor:.2f}x (goal <= 1.5: {'met' if ratio_floor <= 1.5 else 'not met'})")
    print(f"pytorch-ood / oodbench on the {len(common)} shared methods: {ratio_theirs:.1f}x (goal >= 5: "
          f"{'met' if ratio_theirs >= 5 else 'not met'})")
    print(f"shared: {', '.join(common)}")


if __name__ == "__main__":
    start = time.perf_counter()
    main()
    print(f"(the whole script: {time.perf_counter() - start:.0f} s)")
