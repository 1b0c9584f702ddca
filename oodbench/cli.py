"""The `oodbench` command: parse arguments, call the library, print. No math here."""
from __future__ import annotations

import argparse
import json
import os
import sys
import warnings

from oodbench.errors import OODBenchError, system_error_message

EPILOGS = {
    "train": """examples:
  oodbench train --method msp --in fashion_mnist --preset quick
  oodbench train --method msma --in cifar10 --set model.filters=64 --set train.steps=50000
  oodbench train --method msp --in cifar10 --set train.loss=bce --run-name bce
  oodbench train --method msma --in cifar10 --resume          # continue an interrupted run""",
    "score": """examples:
  oodbench score --run runs/classifier-fashion_mnist-s0 --data digits,noise:gaussian --method energy
  oodbench score --model torchvision:resnet18:none --in fashion_mnist --data digits --method msp""",
    "eval": """examples:
  oodbench eval --method msp --in fashion_mnist --out digits,vflip:fashion_mnist,noise:gaussian
  oodbench eval --method msp,energy,odin --in fashion_mnist --out digits --format json
  oodbench eval --method odin --run runs/classifier-cifar10-s0 --out svhn --set odin.temperature=100
  oodbench eval --model torchvision:resnet18:none --in fashion_mnist --out noise:gaussian \\
      --method msp,energy,knn --fit-limit 1000 --limit 300
  oodbench eval --model openood:resnet18_32x32:best.ckpt --in cifar10 --out svhn --method msp,energy""",
    "methods": "example:\n  oodbench methods",
    "data": """examples:
  oodbench data list
  oodbench data check vflip:fashion_mnist
  oodbench data make-resize-benchmark --src lsun --size 32 --out ~/resize_lsun
  oodbench data fetch ninco textures         # sets, resumable and verified (docs/data.md lists what is fetchable)
  oodbench data fetch imagenet200            # every set of a shipped protocol, and its OpenOOD checkpoint
  oodbench data verify                       # every fetched set against its manifest""",
    "bench": """examples:
  oodbench bench                              # = oodbench bench quick: the offline quick benchmark
  oodbench bench cifar10 --device cuda        # a shipped protocol, by name
  oodbench bench my_grid.yaml --out reports/mine
  oodbench bench cifar10 --executor local --jobs 2      # two worker processes on this machine
  oodbench bench cifar10 --executor slurm --partition gpu --gpus-per-job 1 --time-limit 4:00:00
  oodbench bench cifar10 --report-only                  # the report of the cells finished so far
shipped protocols: {protocols}""",
}
DATA_ROOT_HELP = "data root (default: $OODBENCH_DATA, else ~/.cache/oodbench/data)"
RUNS_DIR_HELP = "folder of runs (default: $OODBENCH_RUNS, else ./runs)"
DEVICE_HELP = "auto (a GPU when there is one) | cpu | cuda | cuda:N"


class _Parser(argparse.ArgumentParser):
    """argparse with the one-line error format (the usage block only with --help)."""

    def error(self, message):
        self.exit(2, f"oodbench: error: {message} (see `{self.prog} --help`)\n")


def _parser() -> argparse.ArgumentParser:
    p = _Parser(prog="oodbench", description="Train and benchmark out-of-distribution detectors "
                                "for images. Scores: higher = more out-of-distribution.")
    p.add_argument("--debug", action="store_true", help="show full tracebacks")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    from oodbench import protocols

    def command(name, help_text):
        epilog = EPILOGS.get(name, "").replace("{protocols}", ", ".join(protocols.names())) or None
        return sub.add_parser(name, help=help_text, description=help_text, epilog=epilog,
                              formatter_class=argparse.RawDescriptionHelpFormatter)

    def common(q, run_args=True, set_help="override a config option, e.g. --set train.steps=500 (repeatable)",
               where=""):
        if run_args:
            q.add_argument("--seed", type=int, default=None, help=f"seed of the run (default: the config's, 0){where}")
            q.add_argument("--run-name", default=None,
                           help=f"suffix that keeps a differently configured run apart{where}")
        q.add_argument("--runs-dir", default=None, help=RUNS_DIR_HELP)
        q.add_argument("--data-root", default=None, help=DATA_ROOT_HELP)
        q.add_argument("--device", default="auto", help=DEVICE_HELP)
        q.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE", help=set_help)
        q.add_argument("--debug", action="store_true", help=argparse.SUPPRESS)

    scoring_set = ("override a scoring option, e.g. --set odin.temperature=100 (repeatable; training options such "
                   "as train.steps need a new run: oodbench train ... --run-name NAME)")

    t = command("train", "train the detector of a method on an in-distribution dataset")
    t.add_argument("--method", required=True, help="a method from `oodbench methods`")
    t.add_argument("--in", dest="in_spec", default=None, help="in-distribution dataset (default: the config's)")
    t.add_argument("--preset", default=None, help="config preset: quick (minutes on a laptop CPU), paper (the released "
                   "code's procedure, docs/fidelity.md) or paper-improved (= the defaults)")
    t.add_argument("--resume", action="store_true", help="continue an interrupted training from its newest checkpoint")
    common(t)

    s = command("score", "write OOD scores (higher = more OOD) of a run for datasets, as scores/<method>/<set>.npz")
    s.add_argument("--run", "--run-dir", dest="run", default=None,
                   help="run directory (spell it --run-dir under torchrun, whose own options swallow --run)")
    s.add_argument("--model", default=None, help="score this classifier instead of a run (needs --in): "
                   "torchvision:NAME[:WEIGHTS], timm:NAME[:pretrained], openood:resnet18_32x32:PATH, "
                   "python:MODULE:CALLABLE[:WEIGHTS], torchscript:PATH or run:PATH; A,B,C: a deep ensemble "
                   "(mean logits; --set model.ensemble=softmax for the mean softmax)")
    s.add_argument("--in", dest="in_spec", default=None, help="in-distribution dataset of --model")
    s.add_argument("--fit-limit", type=int, default=None, help="with --model: fit statistics on a seeded, "
                   "class-balanced sample of N training images (default: the whole training split)")
    s.add_argument("--fit-data", default=None, metavar="SPEC", help="with --model: fit statistics on this set's "
                   "training split instead of --in's (e.g. npz:train.npz for --in npz:test.npz)")
    s.add_argument("--data", required=True, help="comma-separated dataset specs")
    s.add_argument("--method", default=None, help="method of the run's kind (default: the one it was trained for)")
    s.add_argument("--limit", type=int, default=None, help="score only the first N images of each set")
    common(s, run_args=False, set_help=scoring_set)

    e = command("eval", "evaluate methods: AUROC, AUPR-In, AUPR-Out, FPR@95TPR, detection error per OOD set")
    e.add_argument("--method", required=True, help="method(s), comma-separated, sharing one run kind")
    e.add_argument("--in", dest="in_spec", default=None, help="in-distribution dataset of the run")
    e.add_argument("--run", "--run-dir", dest="run", default=None,
                   help="run directory instead of --in/--seed/--run-name (--run-dir under torchrun)")
    e.add_argument("--model", default=None, help="evaluate this classifier instead of a run (needs --in): "
                   "torchvision:NAME[:WEIGHTS], timm:NAME[:pretrained], openood:resnet18_32x32:PATH, "
                   "python:MODULE:CALLABLE[:WEIGHTS], torchscript:PATH or run:PATH; A,B,C: a deep ensemble "
                   "(mean logits; --set model.ensemble=softmax for the mean softmax)")
    e.add_argument("--fit-limit", type=int, default=None, help="with --model: fit statistics on a seeded, "
                   "class-balanced sample of N training images (default: the whole training split)")
    e.add_argument("--fit-data", default=None, metavar="SPEC", help="with --model: fit statistics on this set's "
                   "training split instead of --in's (e.g. npz:train.npz for --in npz:test.npz)")
    e.add_argument("--out", required=True, help="comma-separated OOD dataset specs")
    e.add_argument("--limit", type=int, default=None, help="use only the first N images of each test set")
    e.add_argument("--format", choices=("table", "json", "csv"), default="table", help="what to print")
    e.add_argument("--bootstrap", type=int, default=0, metavar="N", help="add N-resample bootstrap 95%% intervals")
    e.add_argument("--csid", default=None, metavar="SPECS", help="comma-separated covariate-shifted ID sets (e.g. "
                   "corrupt:gaussian_noise:3:cifar10): counted as in-distribution, they add the full-spectrum "
                   "(FS-OOD) metrics of ID+csID against each OOD set and the csID accuracy")
    e.add_argument("--joint", action="store_true", help="add the metrics that join classification and detection "
                   "(OSCR, CCR@FPR, AUTC, AURC, AUGRC, ECE, ...; docs/metrics.md) from the classifier's predictions")
    e.add_argument("--tune", action="store_true", help="choose each post-hoc method's options from its grid on "
                   "the ID validation split against tune.val_ood (never a test set); the choice is printed and saved")
    common(e, set_help=scoring_set, where=" (with --in; ignored with --run or --model)")

    m = command("methods", "list the detectors")
    m.add_argument("--options", action="store_true", help="also list each post-hoc method's options, defaults and "
                   "--tune grids")

    ml = command("models", "published checkpoints by name (openood:NAME): source, architecture, local status")
    ml.add_argument("action", choices=("list",), help="list: every entry, its source, architecture, preprocessing and "
                    "whether it is installed and matches its recorded SHA-256")
    ml.add_argument("--data-root", default=None, help=DATA_ROOT_HELP)
    ml.add_argument("--debug", action="store_true", help=argparse.SUPPRESS)

    d = command("data", "datasets: where they are found, checks, derived benchmarks")
    d.add_argument("action", choices=("list", "check", "make-resize-benchmark", "fetch", "verify"),
                   help="list: every named set, found or how to get it; check SPEC: load its splits (exit 2 when "
                   "one is missing); make-resize-benchmark: write resized PNG folders; fetch NAME...: download and "
                   "install sets, protocols' sets or OpenOOD checkpoints (resumable, verified); verify [NAME...]: "
                   "check installed sets against their manifests")
    d.add_argument("spec", nargs="?", help="dataset spec (for check), e.g. vflip:fashion_mnist")
    d.add_argument("more", nargs="*", help=argparse.SUPPRESS)   # fetch / verify take several names
    d.add_argument("--data-root", default=None, help=DATA_ROOT_HELP)
    d.add_argument("--src", help="source dataset spec (make-resize-benchmark)")
    d.add_argument("--size", type=int, default=32, help="target size (make-resize-benchmark)")
    d.add_argument("--out", default=None, help="output folder (make-resize-benchmark)")
    d.add_argument("--debug", action="store_true", help=argparse.SUPPRESS)

    b = command("bench", "run a grid of methods × datasets × seeds and write a report")
    b.add_argument("config", nargs="?", default="quick",
                   help="a shipped protocol name (default: quick) or the path of a bench YAML (docs/bench.md)")
    b.add_argument("--runs-dir", default=None, help=RUNS_DIR_HELP + "; runs the grid needs are trained there")
    b.add_argument("--data-root", default=None, help=DATA_ROOT_HELP)
    b.add_argument("--device", default="auto", help=DEVICE_HELP)
    b.add_argument("--out", default=None, help="report folder (default: the config's)")
    b.add_argument("--export", choices=("openood-csv",), default=None, help="openood-csv: also print the report's "
                   "openood.csv, OpenOOD v1.5's leaderboard CSV schema (protocols with near/far groups)")
    b.add_argument("--report-only", action="store_true", help="train and score nothing: write the report of the "
                   "cells finished so far (the others are listed as not computed)")
    x = b.add_argument_group("executor (default: the YAML's `executor:` section, else sequential; docs/bench.md)")
    x.add_argument("--executor", choices=("sequential", "local", "slurm"), default=None,
                   help="sequential: one process; local: --jobs worker processes; slurm: SLURM jobs via submitit")
    x.add_argument("--jobs", type=int, default=None, metavar="N",
                   help="local: worker processes (default: the CPU count); slurm: jobs running at once")
    x.add_argument("--partition", default=None, help="slurm: partition")
    x.add_argument("--gpus-per-job", type=int, default=None, metavar="N",
                   help="slurm: GPUs per job; a training with N > 1 runs as one DDP job, a rank per GPU")
    x.add_argument("--cpus-per-job", type=int, default=None, metavar="N", help="slurm: CPUs per job (per task)")
    x.add_argument("--time-limit", default=None, metavar="T", help="slurm: time limit of a job, minutes or H:MM:SS")
    x.add_argument("--sbatch", action="append", default=[], metavar="FLAG",
                   help="slurm: an extra sbatch flag, e.g. --sbatch=--qos=high (repeatable)")
    b.add_argument("--debug", action="store_true", help=argparse.SUPPRESS)
    return p


def _split(text: str, option: str) -> list:
    """The comma-separated items of `option`; an empty item (`a,,b`, `""`, `,`) is an error."""
    items = [s.strip() for s in text.split(",")]
    if not all(items):
        raise OODBenchError(f"{option} {text!r}: give comma-separated names with none empty, e.g. {option} a,b")
    return items


def cmd_train(a) -> None:
    from oodbench import workflow

    run = workflow.train(a.method, a.in_spec, a.preset, a.overrides, a.seed, a.runs_dir, a.run_name, a.data_root,
                         a.device, a.resume)
    print(f"{'reused (already trained with this config)' if run.reused else 'trained'}: {run.path}")


def cmd_score(a) -> None:
    from oodbench import data, workflow

    if not (a.run or a.model):
        raise OODBenchError("say what to score: --run RUN_DIR, or --model SPEC --in DATASET")
    specs = _split(a.data, "--data")
    for spec in specs:
        data.check_spec(spec)
    workflow.check_limit(a.limit)
    run, overrides = workflow.find_run(a.method or "msp", a.in_spec, 0, a.runs_dir, a.run, None, a.model, a.fit_limit,
                                       a.overrides, a.data_root, a.fit_data)
    scoring = run.prepare(a.method or run.meta.get("method") or "msp", overrides, a.device)
    for spec in specs:
        arrays = run.score(scoring, spec, a.limit)
        rows = ", ".join(k for k in arrays if not k.startswith("_"))
        print(f"{run.score_path(scoring, spec)}: {len(next(iter(arrays.values())))} images; rows {rows}")


def cmd_eval(a) -> None:
    from oodbench import report, workflow

    methods, outs = _split(a.method, "--method"), _split(a.out, "--out")
    csid = _split(a.csid, "--csid") if a.csid is not None else []
    workflow.check_evaluation(methods, outs, a.limit, a.bootstrap, csid)   # before a model or run is loaded
    run, overrides = workflow.find_run(methods[0], a.in_spec, a.seed or 0, a.runs_dir, a.run, a.run_name, a.model,
                                       a.fit_limit, a.overrides, a.data_root, a.fit_data)
    rows = workflow.evaluate(run, methods, outs, a.limit, overrides, a.device, a.bootstrap, a.tune, a.joint,
                             save=False, csid=csid)
    try:   # results computed from cached scores are printed even where they cannot be saved (a read-only runs folder)
        workflow.save_metrics(run, rows)
        not_saved = None
    except OSError as e:
        not_saved = f"oodbench: warning: results not saved: {system_error_message(e)}"
    if a.format == "json":
        print(report.json_rows(rows))
    elif a.format == "csv":
        print(report.csv_rows(rows), end="")
    else:
        print(report.markdown_table(rows))
        accuracy = {r["method"]: r["id_accuracy"] for r in rows if "id_accuracy" in r}
        if accuracy:
            print("\nin-distribution test accuracy: " + ", ".join(f"{m} {100 * a:.2f}%" for m, a in accuracy.items()))
        accuracy = {r["method"]: r["csid_accuracy"] for r in rows if "csid_accuracy" in r}
        if accuracy:
            print("csID test accuracy (" + ", ".join(csid) + "): " +
                  ", ".join(f"{m} {100 * a:.2f}%" for m, a in accuracy.items()))
        bpd = {r["in"]: r["id_bpd"] for r in rows if "id_bpd" in r}
        bpd.update({r["out"]: r["out_bpd"] for r in rows if "out_bpd" in r})
        if bpd:
            print("\nmean bits per dimension (foreground model; lower = more likely): " +
                  ", ".join(f"{spec} {v:.3f}" for spec, v in bpd.items()))
        tuned = {k: v for r in rows for k, v in (r.get("tuned") or {}).items()}
        if tuned:
            print("\ntuned on validation data: " + ", ".join(f"{k}={v}" for k, v in tuned.items()))
        if not not_saved:
            print(f"\nsaved: {run.path / 'metrics.json'} and metrics.csv")
    if not_saved:
        print(not_saved, file=sys.stderr)


def cmd_methods(a) -> None:
    from oodbench.detectors import REGISTRY, PostHoc
    from oodbench.detectors.recipes import RECIPES   # how the classifier is trained: oodbench train --method NAME

    width = max(map(len, [*REGISTRY, *RECIPES]))
    for name in sorted(REGISTRY, key=lambda n: (REGISTRY[n].kind, n)):
        cls = REGISTRY[name]
        print(f"{name:<{width}}  [{cls.kind}]  {cls.summary}")
        if a.options and issubclass(cls, PostHoc):
            for key, option in cls.OPTIONS.items():
                grid = f"  (--tune: {list(option.grid)})" if option.grid else ""
                print(f"{'':<{width}}    {name}.{key} = {option.default!r}: {option.help}{grid}")
    for name, cls in RECIPES.items():
        print(f"{name:<{width}}  [recipe]  {cls.summary}")
        for key, option in cls.OPTIONS.items() if a.options else ():
            print(f"{'':<{width}}    {name}.{key} = {option.default!r}: {option.help}")


def cmd_data(a) -> None:
    from oodbench import data

    if a.action in ("fetch", "verify"):
        names = [n for n in [a.spec, *a.more] if n]
        return (data_fetch if a.action == "fetch" else data_verify)(names, data.data_root(a.data_root))
    if a.action == "list":
        print(f"data root: {data.data_root(a.data_root)} (--data-root, else $OODBENCH_DATA, else the default)")
        from oodbench.data import catalog

        for row in data.dataset_status(a.data_root):
            where = row["found"] or "missing"
            fetchable = catalog.ALIASES.get(row["name"], row["name"]) in catalog.ENTRIES
            how = f"`oodbench data fetch {row['name']}`, or: {row['how_to_get']}" if fetchable else row["how_to_get"]
            print(f"{row['name']:<14} {where}" + ("" if row["found"] else f"\n{'':<14} how to get: {how}"))
    elif a.action == "check":
        if not a.spec:
            raise OODBenchError("oodbench data check needs a dataset spec, e.g. oodbench data check digits")
        missing = []
        for split in ("train", "test"):
            try:
                s = data.load(a.spec, split=split, root=a.data_root)
            except OODBenchError as e:
                print(f"{a.spec} [{split}]: {e}")
                missing.append(split)
                continue
            labels = "labels" if s.labels is not None else "no labels"
            print(f"{a.spec} [{split}]: {len(s)} images of shape {s.shape}, uint8, {labels}, fingerprint {s.fingerprint}")
        if missing:
            raise OODBenchError(f"{a.spec}: the {' and '.join(missing)} split{'s are' if len(missing) > 1 else ' is'} "
                                f"not available (data root {data.data_root(a.data_root)})")
    else:
        if not (a.src and a.out):
            raise OODBenchError("make-resize-benchmark needs --src SPEC and --out FOLDER")
        written = data.write_resize_benchmark(a.src, a.size, a.out, root=a.data_root)
        for method, folder in written.items():
            print(f"{method:<9} {folder}   (use as folder:{folder})")


def cmd_models(a) -> None:
    from oodbench import model_registry

    for row in model_registry.rows(a.data_root):
        print(f"{row['name']:<28} {row['status']:<9} {row['arch']:<17} in={row['dataset']:<12} {row['preprocessing']}")
        print(f"{'':<28} {row['path']}  (oodbench data fetch {row['fetch']}; {row['source']})")
    print("torchvision:NAME[:WEIGHTS] and timm:NAME[:pretrained] load through torchvision's / timm's own registries")


def data_fetch(names: list, root) -> None:
    from oodbench.data import catalog

    if not names:
        raise OODBenchError("oodbench data fetch needs names: sets, shipped protocols or OpenOOD checkpoint archives, "
                            "e.g. oodbench data fetch ninco (all: see docs/data.md)")
    wanted, manual = catalog.expand(names, root)
    for name in wanted:
        catalog.fetch_set(name, root)
    if manual:
        for name, how in manual:
            print(f"{name}: cannot be fetched; to get it: {how}")
        raise OODBenchError(f"not fetched (place by hand, see above): {', '.join(n for n, _ in manual)}")


def data_verify(names: list, root) -> None:
    from oodbench.data import fetch

    names = names or fetch.manifest_names(root)
    if not names:
        raise OODBenchError(f"no set under {root} has a manifest yet; install sets with `oodbench data fetch NAME`")
    bad = []
    for name in names:
        problems = fetch.verify(root, name)
        man = fetch.load_manifest(root, name)
        for problem in problems:
            print(f"{name}: {problem}")
        state = f"{len(problems)} problem(s)" if problems else "ok"
        print(f"{name}: {state}: {len(man['files'])} files, {man['images']} images ({fetch.trust_note(man)})")
        bad += [name] if problems else []
    if bad:
        raise OODBenchError(f"{', '.join(bad)} did not verify; `oodbench data fetch {' '.join(bad)}` deletes and "
                            f"fetches {'them' if len(bad) > 1 else 'it'} again")


def cmd_bench(a) -> None:
    from oodbench import bench

    time_limit = int(a.time_limit) if a.time_limit and a.time_limit.isdigit() else a.time_limit
    executor = {"name": a.executor, "jobs": a.jobs, "partition": a.partition, "gpus": a.gpus_per_job,
                "cpus": a.cpus_per_job, "time": time_limit, "sbatch": tuple(a.sbatch)}
    folder = bench.run_bench(a.config, runs_dir=a.runs_dir, data_root=a.data_root, device=a.device, out=a.out,
                             executor=executor, report_only=a.report_only)
    results = json.loads((folder / "results.json").read_text())
    for skipped in results["skipped"]:
        print(f"oodbench: not available, skipped: {skipped['dataset']}: {skipped['reason']}", file=sys.stderr)
    print(bench.auroc_tables(results))
    print(f"full report (all metrics, confidence intervals, plots): {folder / 'report.md'}")
    if a.export == "openood-csv":
        if not (folder / "openood.csv").is_file():
            raise OODBenchError("--export openood-csv needs a protocol with near and far groups (OpenOOD's), e.g. "
                                "oodbench bench cifar10")
        print(f"OpenOOD leaderboard CSV: {folder / 'openood.csv'}")
        print((folder / "openood.csv").read_text(), end="")


def _one_line_warning(message, category, filename, lineno, file=None, line=None) -> None:
    """Python warnings (torch's among them) as one `oodbench: warning:` line each; the full text with --debug."""
    text = (str(message).strip().splitlines() or [category.__name__])[0]
    print(f"oodbench: warning: {text}", file=sys.stderr)


def main(argv=None) -> int:
    parser = _parser()
    try:
        a = parser.parse_args(argv)
    except SystemExit as e:   # --help (0) or a usage error (2, already printed on one line)
        return e.code if isinstance(e.code, int) else 2
    if a.command is None:
        parser.print_help()
        return 0
    handler = {"train": cmd_train, "score": cmd_score, "eval": cmd_eval, "methods": cmd_methods,
               "models": cmd_models,
               "data": cmd_data, "bench": cmd_bench}[a.command]
    try:
        with warnings.catch_warnings():
            if not (a.debug or os.environ.get("OODBENCH_DEBUG")):
                warnings.showwarning = _one_line_warning
            handler(a)
    except OODBenchError as e:
        if a.debug or os.environ.get("OODBENCH_DEBUG"):
            raise
        print(f"oodbench: error: {e}", file=sys.stderr)
        return 2
    except (OSError, MemoryError) as e:
        if a.debug or os.environ.get("OODBENCH_DEBUG"):
            raise
        print(f"oodbench: error: {system_error_message(e)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("oodbench: interrupted; checkpoints written so far are kept (continue with --resume)", file=sys.stderr)
        return 130
    from oodbench.engine import distributed

    distributed.shutdown()
    return 0
