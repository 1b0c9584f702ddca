"""`oodbench bench`: a grid of methods × in-distribution sets × OOD sets × seeds → one report folder.

Check which datasets are on disk, train the runs that are missing (or finish interrupted ones), score each method
on each set (through the runs' score caches), evaluate, and write `report.md`, `results.csv`,
`results_per_seed.csv`, `results.json` and PNG plots. A finished cell (method × ID × OOD × seed) is kept in
`<report>/cells/`, so an interrupted or repeated bench redoes only what is missing. A failing cell is reported and the
rest goes on; a dataset that is not on disk is skipped with a note. The trainings and scoring units run one after
another, on local worker processes or as SLURM jobs (`executor:`). The YAML format is in docs/bench.md.

Modules: plan (the YAML and the work it plans), cells (scoring a unit, the cell cache), execute (run_bench and the
executors), slurm (submitit), aggregate (rows, failures, notes, timing), report (the report files).
"""
from oodbench.bench.aggregate import report_notes, summarise
from oodbench.bench.cells import Recorder, load_plot_scores
from oodbench.bench.execute import run_bench
from oodbench.bench.plan import Bench, Entry, ExecutorOptions, load_bench, renamer
from oodbench.bench.report import auroc_tables, check_report_folder, markdown_report

__all__ = ["Bench", "Entry", "ExecutorOptions", "Recorder", "auroc_tables", "check_report_folder", "load_bench",
           "load_plot_scores",
           "markdown_report", "renamer", "report_notes", "run_bench", "summarise"]
