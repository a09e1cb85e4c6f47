"""The fine-tuning study of docs/results.md: from a dense trained net to N:M, which recipe wins?

Pre-registered and paired (the protocol is docs/results.md, "Fine-tuning from a dense model",
committed before the first run). For every dataset and seed a dense net is trained to convergence
(examples/study.py's recipe, longer); then, at every sparsity N:M, every arm starts from that one
dense checkpoint:

    oneshot        one-shot magnitude N:M (spre_fx.prepare(spre=False)), no fine-tuning
    asp            one-shot, then fine-tuning under fixed masks (MaskScheduler nm_freeze_after=0): ASP
    srste          fine-tuning with N:M masks moving (SR-STE)
    spre           SpRe fine-tuning, the paper's branch initialisation
    spre-silent    SpRe fine-tuning, the branch BN's γ starting at 0 (prepare(silent_branch=True))

and, where spre_fx exposes a channel permutation (`spre_fx.permute_channels`), `oneshot+perm`,
`asp+perm` and `BEST+perm` (BEST: the fine-tuning arm with the highest mean accuracy over the
cells, after the main grid). Every fine-tuning arm gets the same steps, LR schedule and batch order.
Every model has its BatchNorm statistics re-estimated on the training split under its final masks
(spre_fx.recalibrate_bn), is converted (spre_fx.convert, checked by spre_fx.verify) and scored
deployed on the test split.

    PYTHONPATH=. .venv/bin/python examples/finetune_study.py --jobs 3 --out out/finetune
    PYTHONPATH=. .venv/bin/python examples/finetune_study.py --quick --out out/finetune-quick
    PYTHONPATH=. .venv/bin/python examples/finetune_study.py --from-json out/finetune/results.json
    PYTHONPATH=. .venv/bin/python examples/finetune_study.py --permutation-cost --out out/finetune
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import multiprocessing
import statistics
import time
from collections.abc import Callable
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
from digits import Method, Run, accuracy, deploy, train
from matplotlib.figure import Figure
from paired import (
    by_seed,
    difference_summary,
    fingerprint,
    fmt_difference,
    fmt_mean_sd,
    mean_summary,
    pairing_check,
)
from plots import Panel, Series, draw_forest, plot_accuracy, save
from study import (
    Recipe,
    nm_sparsity,
    read_results,
    recalibration_table,
    sparsified_layers,
    start_study,
    study_parser,
    write_results,
    write_summary,
)
from torch import Tensor, nn

import spre_fx

ARMS = ("oneshot", "asp", "srste", "spre", "spre-silent")
FINETUNED = ARMS[1:]
PERMUTED = ("oneshot+perm", "asp+perm", "best+perm")  # best+perm is resolved after the main grid
LABELS = {"oneshot": "(a) one-shot", "asp": "(b) ASP: fixed masks", "srste": "(c) SR-STE",
          "spre": "(d) SpRe, paper init", "spre-silent": "(e) SpRe, silent branch"}
# Cheapest first (what a fine-tuning step costs): the tie-break of the recommendation rule.
COST_ORDER = ("asp", "srste", "spre-silent", "spre")
FINETUNE_SEED = 1000  # fine-tuning batches come from seed 1000 + s, not the pretraining order of seed s


def permutation_function() -> Callable | None:
    """spre_fx's channel permutation, when this version of spre_fx has one."""
    return getattr(spre_fx, "permute_channels", None)


# --------------------------------------------------------------------------- recipes
@dataclass(frozen=True)
class Study:
    """One dataset's dense pretraining recipe and the fine-tuning recipe every arm shares."""

    pretrain: Recipe
    finetune_epochs: int
    finetune_lr: float

    @property
    def finetune(self) -> Recipe:
        """The pretraining recipe with fewer epochs, a lower peak LR and no warm-up (cosine to 0)."""
        return replace(self.pretrain, epochs=self.finetune_epochs, lr=self.finetune_lr, warmup_epochs=0)


STUDIES = {
    "digits": Study(Recipe("digits", width=8, epochs=20, batch=64, lr=0.05), finetune_epochs=4,
                    finetune_lr=0.01),
    "mnist": Study(Recipe("mnist", width=8, epochs=12, batch=32, lr=0.05, train_size=1000),
                   finetune_epochs=2, finetune_lr=0.01),
}
QUICK = {
    "digits": Study(Recipe("digits", width=8, epochs=2, batch=128, lr=0.05), finetune_epochs=1,
                    finetune_lr=0.01),
    "mnist": Study(Recipe("mnist", width=8, epochs=1, batch=64, lr=0.05, train_size=128),
                   finetune_epochs=1, finetune_lr=0.01),
}


# --------------------------------------------------------------------------- one run
@dataclass(frozen=True)
class Job:
    dataset: str
    seed: int
    arm: str  # "dense" (the pretraining), one of ARMS, or ARM+perm
    nm: tuple[int, int] | None = None

    @property
    def label(self) -> str:
        return self.arm if self.nm is None else f"{self.arm} {self.nm[0]}:{self.nm[1]}"

    @property
    def base(self) -> str:
        return self.arm.removesuffix("+perm")


def checkpoint_path(out: Path, dataset: str, seed: int) -> Path:
    return out / "pretrained" / f"{dataset}-seed{seed}.pt"


def pretrain(job: Job, study: Study, out: Path) -> dict:
    """Train the dense net of (dataset, seed) and save its state_dict; score it deployed (BN folded)."""
    torch.set_num_threads(1)
    start, cpu_start = time.perf_counter(), time.process_time()
    recipe = study.pretrain
    data = recipe.load()
    run = train(Method("dense", "dense"), job.seed, data, recipe, [], build=recipe.build)
    path = checkpoint_path(out, job.dataset, job.seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(run.model.state_dict(), path)
    digest = fingerprint(run.model.state_dict().values())  # what the arms load (recalibration follows)
    deploy(run, sparsified_layers(recipe), data[2], data[3], recalibrate=data[0])
    return {**asdict(job), "nm": None, "label": job.label, "test_acc": run.test_acc,
            "epoch_test_acc": run.accs, "epoch_train_loss": run.losses,
            "steps": recipe.epochs * math.ceil(len(data[0]) / recipe.batch),
            "pretrained_digest": digest,
            "seconds": time.perf_counter() - start, "cpu_seconds": time.process_time() - cpu_start}


def kept_magnitude(prepared: nn.Module) -> float:
    """Share of Σ|w| over the N:M layers that their masks keep (ASP's objective)."""
    kept = total = 0.0
    for module in prepared.modules():
        mask = getattr(module, "nm_mask", None)
        if isinstance(mask, Tensor):
            w = module.weight.detach().abs()
            kept += float((w * mask).sum())
            total += float(w.sum())
    return kept / total


def permute(model: nn.Module, nm: tuple[int, int], x: Tensor) -> tuple[nn.Module, float]:
    """The dense model with channels permuted for N:M, and its relative output error (must be ~1e-6)."""
    fn = permutation_function()
    if fn is None:
        raise RuntimeError("spre_fx has no permute_channels: the +perm arms need it (skip them)")
    permuted = fn(model, nm=nm)
    if not isinstance(permuted, nn.Module):
        raise TypeError(f"spre_fx.permute_channels returned {type(permuted).__name__}, expected the model")
    with torch.no_grad():
        ref, got = model.eval()(x), permuted.eval()(x)
    error = float((got - ref).abs().max() / ref.abs().max())
    if error > 1e-5:
        raise RuntimeError(f"the permuted dense model differs from the original: relative error {error:.2e}")
    return permuted, error


def permutation_cost(out: Path, datasets: list[str], sparsities: list[tuple[int, int]],
                     seeds: list[int]) -> dict:
    """What `spre_fx.permute_channels` does to the dense checkpoints in OUT, per (dataset, N:M): its
    CPU seconds on one thread (tracing and search), groups permuted, coverage and the share of Σ|w|
    that N:M keeps in the searched columns before and after. Runs nothing of the study."""
    torch.set_num_threads(1)
    rows = {}
    for ds in datasets:
        for nm in sparsities:
            cpu, records = [], []
            for seed in seeds:
                model = STUDIES[ds].finetune.build()
                model.load_state_dict(torch.load(checkpoint_path(out, ds, seed), weights_only=True))
                start = time.process_time()
                permuted = permutation_function()(model, nm=nm)
                cpu.append(time.process_time() - start)
                records.append(spre_fx.permutation_of(permuted))
            rows[f"{ds} {nm[0]}:{nm[1]}"] = {
                "seeds": len(seeds), "cpu_seconds_mean": statistics.fmean(cpu), "cpu_seconds_max": max(cpu),
                "groups": len(records[0].groups),
                "permuted_groups": statistics.fmean(sum(g.applied for g in r.groups) for r in records),
                "coverage": statistics.fmean(r.coverage for r in records),
                "kept_before": statistics.fmean(r.share_kept(after=False) for r in records),
                "kept_after": statistics.fmean(r.share_kept(after=True) for r in records)}
    return rows


def permutation_cost_table(rows: dict) -> str:
    lines = ["| dataset N:M | CPU-s per model (mean, max) | groups permuted (mean) | coverage | "
             "Σ|w| kept in the searched columns, before → after |", "|---|---|---|---|---|"]
    for name, r in rows.items():
        lines.append(f"| {name} | {r['cpu_seconds_mean']:.3f}, {r['cpu_seconds_max']:.3f} | "
                     f"{r['permuted_groups']:.1f} of {r['groups']} | {100 * r['coverage']:.0f} % | "
                     f"{100 * r['kept_before']:.2f} % → {100 * r['kept_after']:.2f} % |")
    return "\n".join(lines)


def run_arm(job: Job, study: Study, out: Path) -> dict:
    """One arm at one (dataset, seed, N:M): from the dense checkpoint to a scored deployed model."""
    torch.set_num_threads(1)
    start, cpu_start = time.perf_counter(), time.process_time()
    recipe = study.finetune
    data = recipe.load()
    x_train, _, x_test, y_test = data
    layers = sparsified_layers(recipe)
    dense = recipe.build()
    state = torch.load(checkpoint_path(out, job.dataset, job.seed), weights_only=True)
    dense.load_state_dict(state)
    permutation_error = None
    if job.arm.endswith("+perm"):
        dense, permutation_error = permute(dense, job.nm, x_test[:256])
    spre = job.base.startswith("spre")
    method = Method(job.label, "spre" if spre else "srste", rate=1 - job.nm[0] / job.nm[1], nm=job.nm)
    steps = recipe.epochs * math.ceil(len(x_train) / recipe.batch)
    freeze = int(recipe.freeze_at * steps)
    kept: list[float] = []
    batches = hashlib.blake2b(digest_size=8)
    if job.base == "oneshot":
        run = Run(method, job.seed, spre_fx.prepare(dense, nm=job.nm, spre=False))
        kept.append(kept_magnitude(run.model))
        steps = 0
    else:
        schedule = {"nm_freeze_after": 0 if job.base == "asp" else freeze}
        if spre:
            schedule["spatial_freeze_after"] = freeze
        options = {"silent_branch": job.base == "spre-silent"} if spre else {}
        run = train(method, FINETUNE_SEED + job.seed, data, recipe, layers, build=lambda: dense,
                    schedule=schedule, prepare_options=options,
                    adapt=lambda model: kept.append(kept_magnitude(model)), eval_each_epoch=False,
                    on_batch=lambda idx: batches.update(idx.numpy().tobytes()))
    eval_before = accuracy(run.model, x_test, y_test)
    deploy(run, layers, x_test, y_test, recalibrate=x_train)
    return {**asdict(job), "nm": f"{job.nm[0]}:{job.nm[1]}", "label": job.label, "test_acc": run.test_acc,
            "eval_acc_before_recalibration": eval_before, "convert_error": run.convert_error,
            "sparsity": run.sparsity, "kept_magnitude": kept[0], "permutation_error": permutation_error,
            "final_loss": run.losses[-1] if run.losses else None, "steps": steps,
            "pretrained_digest": fingerprint(state.values()),
            "batches_digest": batches.hexdigest() if steps else None,
            "seconds": time.perf_counter() - start, "cpu_seconds": time.process_time() - cpu_start}


# --------------------------------------------------------------------------- analysis
def arm_order(arm: str) -> tuple[int, bool]:
    """Sort key of arm names: (a)-(e), each followed by its +perm variant; "dense" first."""
    base = arm.removesuffix("+perm")
    return (ARMS.index(base) + 1 if base in ARMS else 0, arm.endswith("+perm"))


# The paired comparisons the protocol names, (a, b) for a − b.
COMPARISONS = (
    ("asp", "oneshot"), ("srste", "oneshot"), ("spre", "oneshot"), ("spre-silent", "oneshot"),
    ("srste", "asp"), ("spre", "asp"), ("spre-silent", "asp"),
    ("spre", "srste"), ("spre-silent", "srste"), ("spre-silent", "spre"),
)


# Permutation: X+perm − X for each arm run both ways (pre-registered); and, not pre-registered
# (descriptive only), whether permuted ASP reaches SR-STE without permutation.
PERMUTATION_PAIRS = tuple((f"{a}+perm", a) for a in ARMS)
EXPLORATORY = (("asp+perm", "srste"),)


def best_finetuned(records: list[dict]) -> str | None:
    """The fine-tuning arm with the highest mean deployed accuracy over every cell (arm (f))."""
    means = {arm: [r["test_acc"] for r in records if r["arm"] == arm] for arm in FINETUNED}
    means = {arm: statistics.fmean(v) for arm, v in means.items() if v}
    return max(means, key=means.get) if means else None


def _between(cell: dict, a: str, b: str) -> dict | None:
    """The paired difference a − b of a cell, whichever way round the protocol names it."""
    if d := cell["diffs"].get(f"{a} - {b}"):
        return d
    if d := cell["diffs"].get(f"{b} - {a}"):
        return {**d, "mean": -d["mean"]}
    return None


def recommend(cells: list[dict]) -> dict:
    """The protocol's rule: the cheapest fine-tuning arm that no other beats significantly in any
    cell; if every arm is beaten somewhere, the one beaten in the fewest cells (then the cheapest)."""
    beaten: dict[str, list[str]] = {arm: [] for arm in COST_ORDER}
    for cell in cells:
        for arm in COST_ORDER:
            by = [b for b in COST_ORDER if b != arm and (d := _between(cell, arm, b)) and d["significant"]
                  and d["mean"] < 0]
            if by:
                beaten[arm].append(f"{cell['dataset']} {cell['nm']} (by {', '.join(by)})")
    arm = min(COST_ORDER, key=lambda a: (len(beaten[a]), COST_ORDER.index(a)))
    return {"arm": arm, "beaten": beaten}


def analyse(records: list[dict]) -> dict:
    """Every number the docs report, from the per-run records."""
    dense = {ds: by_seed(records, ds, "dense") for ds in dict.fromkeys(r["dataset"] for r in records)}
    cells = []
    keys = {(r["dataset"], r["nm"]) for r in records if r["nm"] is not None}
    for ds, nm in sorted(keys, key=lambda c: (c[0], nm_sparsity(c[1]))):
        arms = dict.fromkeys(r["arm"] for r in records if r["dataset"] == ds and r["nm"] == nm)
        acc = {arm: by_seed(records, ds, f"{arm} {nm}") for arm in arms}
        cell = {"dataset": ds, "nm": nm, "arms": {arm: mean_summary(v) for arm, v in acc.items()}}
        if dense.get(ds):
            cell["arms"]["dense"] = mean_summary(dense[ds])
        pairs = [*COMPARISONS, *PERMUTATION_PAIRS, *[("dense", a) for a in FINETUNED]]
        acc["dense"] = dense.get(ds, {})
        for key, chosen in (("diffs", pairs), ("exploratory", EXPLORATORY)):
            cell[key] = {f"{a} - {b}": d for a, b in chosen
                         if acc.get(a) and acc.get(b) and (d := difference_summary(acc[a], acc[b]))}
        kept = {arm: statistics.fmean(r["kept_magnitude"] for r in records
                                      if r["dataset"] == ds and r["nm"] == nm and r["arm"] == arm)
                for arm in ("oneshot", "oneshot+perm") if arm in arms}
        cell["kept_magnitude"] = kept
        cells.append(cell)
    convergence = {}
    for ds in dense:
        curves = [r["epoch_test_acc"] for r in records if r["dataset"] == ds and r["arm"] == "dense"]
        if curves:
            e = len(curves[0])
            at = sorted({max(1, e // 2), max(1, 3 * e // 4), e})
            convergence[ds] = {f"epoch {k}": statistics.fmean(c[k - 1] for c in curves) for k in at}
    cost = {}
    for ds in sorted({r["dataset"] for r in records}):
        for arm in sorted({r["arm"] for r in records if r["dataset"] == ds}, key=arm_order):
            sub = [r for r in records if r["arm"] == arm and r["dataset"] == ds]
            cost[f"{ds} {arm}"] = {"cpu_seconds": statistics.fmean(r["cpu_seconds"] for r in sub),
                                   "steps": sub[0]["steps"]}
    errors = [r["convert_error"] for r in records if r.get("convert_error") is not None]
    permuted = [r["permutation_error"] for r in records if r.get("permutation_error") is not None]
    return {
        "cells": cells,
        "dense_convergence": convergence,
        "cost": cost,
        "best_finetuned": best_finetuned(records),
        "recommendation": recommend(cells) if cells else None,
        "recalibration": {f"{c['dataset']} {arm} {c['nm']}": {
            "before": statistics.fmean(r["eval_acc_before_recalibration"] for r in records if
                                       (r["dataset"], r["nm"], r["arm"]) == (c["dataset"], c["nm"], arm)),
            "after": c["arms"][arm]["mean"]} for c in cells for arm in sorted(c["arms"], key=arm_order)
            if arm != "dense"},
        "max_convert_error": max(errors, default=None),
        "permuted_runs": len(permuted),
        "max_permutation_error": max(permuted, default=None),
        "pairing": pairing_check(records, ("pretrained_digest", "batches_digest")),
        "cpu_seconds": sum(r["cpu_seconds"] for r in records),
    }


def tables(summary: dict) -> str:
    """Markdown tables of the summary (docs/results.md pastes them)."""
    cells = summary["cells"]
    arms = sorted({a for c in cells for a in c["arms"] if a != "dense"}, key=arm_order)
    lines = ["| dataset | N:M | dense | " + " | ".join(LABELS.get(a, a) for a in arms) + " |",
             "|---|---|---|" + "---|" * len(arms)]
    for c in cells:
        lines.append(f"| {c['dataset']} | {c['nm']} | {fmt_mean_sd(c['arms'].get('dense'))} | "
                     + " | ".join(fmt_mean_sd(c["arms"].get(a)) for a in arms) + " |")
    names = list(dict.fromkeys(k for c in cells for k in c["diffs"]))
    columns = " | ".join(f"{c['dataset']} {c['nm']}" for c in cells)
    lines += ["", f"| paired difference, points | {columns} |", "|---|" + "---|" * len(cells)]
    for name in names:
        row = " | ".join(fmt_difference(c["diffs"].get(name)) for c in cells)
        lines.append(f"| {name.replace(' - ', ' − ')} | {row} |")
    lines += permutation_tables(cells)
    lines += ["", f"| share of Σ|w| N:M keeps (one-shot, mean over seeds) | {columns} |",
              "|---|" + "---|" * len(cells)]
    for arm in ("oneshot", "oneshot+perm"):
        if any(arm in c["kept_magnitude"] for c in cells):
            kept = [c["kept_magnitude"].get(arm) for c in cells]
            shares = " | ".join("-" if k is None else f"{100 * k:.1f} %" for k in kept)
            lines.append(f"| {arm} | {shares} |")
    if all(len(c["kept_magnitude"]) == 2 for c in cells):
        gains = [c["kept_magnitude"]["oneshot+perm"] - c["kept_magnitude"]["oneshot"] for c in cells]
        lines.append("| permutation's gain, points | " + " | ".join(f"{100 * g:+.2f}" for g in gains) + " |")
    if summary["dense_convergence"]:
        lines += ["", "| dense pretraining, test accuracy (eval mode, mean over seeds) | by epoch |",
                  "|---|---|"]
        for ds, at in summary["dense_convergence"].items():
            lines.append(f"| {ds} | " + ", ".join(f"{k}: {100 * v:.2f}" for k, v in at.items()) + " |")
    lines += ["", "| run (mean over seeds) | optimizer steps | CPU-s per run |", "|---|---|---|"]
    for name, c in summary["cost"].items():
        lines.append(f"| {name} | {c['steps']} | {c['cpu_seconds']:.1f} |")
    lines += ["", *recalibration_table(summary["recalibration"])]
    return "\n".join(lines)


def permutation_tables(cells: list[dict]) -> list[str]:
    """Each permuted arm beside its arm, with the paired difference; then the comparisons that were
    not pre-registered. Empty when no arm ran with permutation."""
    arms = [a for a in ARMS if any(f"{a}+perm" in c["arms"] for c in cells)]
    if not arms:
        return []
    head = " | ".join(f"{a} | {a}+perm | {a}+perm − {a}" for a in arms)
    lines = ["", f"| dataset | N:M | {head} |", "|---|---|" + "---|" * 3 * len(arms)]
    for c in cells:
        row = " | ".join(f"{fmt_mean_sd(c['arms'].get(a))} | {fmt_mean_sd(c['arms'].get(a + '+perm'))} | "
                         f"{fmt_difference(c['diffs'].get(f'{a}+perm - {a}'))}" for a in arms)
        lines.append(f"| {c['dataset']} | {c['nm']} | {row} |")
    names = list(dict.fromkeys(k for c in cells for k in c.get("exploratory", {})))
    if names:
        columns = " | ".join(f"{c['dataset']} {c['nm']}" for c in cells)
        lines += ["", f"| not pre-registered (descriptive), points | {columns} |",
                  "|---|" + "---|" * len(cells)]
        for name in names:
            row = " | ".join(fmt_difference(c["exploratory"].get(name)) for c in cells)
            lines.append(f"| {name.replace(' - ', ' − ')} | {row} |")
    return lines


# --------------------------------------------------------------------------- figure
_STYLE = {"oneshot": ("tab:gray", "o"), "asp": ("tab:green", "s"), "srste": ("tab:blue", "^"),
          "spre": ("tab:red", "v"), "spre-silent": ("tab:orange", "D")}


def plot_finetune_accuracy(summary: dict, path: Path) -> None:
    """Deployed test accuracy vs sparsity per arm (mean, 95 % t interval over seeds), one panel per
    dataset; dashed: the dense nets; hollow markers: the arm with channel permutation."""
    panels = {}
    for ds in dict.fromkeys(c["dataset"] for c in summary["cells"]):
        cells = [c for c in summary["cells"] if c["dataset"] == ds]
        rates = [nm_sparsity(c["nm"]) for c in cells]
        arms = sorted({a for c in cells for a in c["arms"] if a != "dense"}, key=arm_order)
        series = []
        for i, arm in enumerate(arms):
            color, marker = _STYLE[arm.removesuffix("+perm")]
            pts = [(x + (i - len(arms) / 2) * 0.004, c["arms"][arm]) for x, c in zip(rates, cells)
                   if arm in c["arms"]]
            perm = arm.endswith("+perm")
            series.append(Series(*zip(*pts), {"marker": marker, "capsize": 2, "color": color,
                                              "ls": ":" if perm else "-", "mfc": "white" if perm else color,
                                              "label": LABELS.get(arm, arm)}))
        dense = cells[0]["arms"].get("dense")
        panels[ds] = Panel(tuple(c["nm"] for c in cells), tuple(rates), dense, tuple(series))
    plot_accuracy(panels, path, (4.6, 3.8),
                  "from a dense net: mean over seeds, bars: 95% t interval of the mean")


# The paired differences of the second plot: left, the recipes (what decides the recommendation);
# right, what permutation changed (its own scale: a few points, not tens).
FOREST = (("srste - asp", "spre-silent - asp", "spre - asp", "spre-silent - srste", "spre-silent - spre"),
          tuple(f"{a} - {b}" for a, b in PERMUTATION_PAIRS))


def plot_finetune_differences(summary: dict, path: Path) -> None:
    """The paired differences per cell, points with 95 % t intervals: the recipes' comparisons, and
    (a second panel, when any arm ran with permutation) X+perm − X; filled markers: the interval
    excludes 0."""
    color = lambda name: _STYLE[name.split(" - ")[0].removesuffix("+perm")][0]
    panels = [[(f"{c['dataset']} {c['nm']}: {name.replace(' - ', ' − ')}", c["diffs"][name], color(name))
               for c in summary["cells"] for name in names if name in c["diffs"]] for names in FOREST]
    panels = [rows for rows in panels if rows]
    if not panels:
        return
    height = 0.26 * max(len(rows) for rows in panels) + 0.9
    fig = Figure(figsize=(5.2 * len(panels), height), layout="constrained")
    titles = iter(("recipes", "channel permutation: X+perm − X") if len(panels) == 2 else ("",))
    for ax, rows, title in zip(fig.subplots(1, len(panels), squeeze=False)[0], panels, titles):
        draw_forest(ax, rows)
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("paired difference, points (95% t interval over seeds)", fontsize=8)
    fig.suptitle("deployed test accuracy, paired by seed; filled: the interval excludes 0", fontsize=8)
    save(fig, path)


# --------------------------------------------------------------------------- main
def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = study_parser(__doc__.splitlines()[0], list(STUDIES), "out/finetune")
    p.add_argument("--arms", nargs="+", choices=ARMS, default=list(ARMS))
    p.add_argument("--perm-arms", nargs="*", choices=PERMUTED, default=list(PERMUTED),
                   help="arms with channel permutation first (run only when spre_fx.permute_channels exists)")
    p.add_argument("--resume", action="store_true",
                   help="keep the runs (and dense checkpoints) already in OUT and run only the missing ones")
    p.add_argument("--permutation-cost", action="store_true",
                   help="only time spre_fx.permute_channels on the dense checkpoints in OUT/pretrained "
                        "(writes OUT/permutation_cost.json)")
    return p.parse_args(argv)


def _execute(jobs: list[Job], studies: dict[str, Study], out: Path, processes: int, done: list[dict],
             save: Callable[[], None], total: int) -> None:
    """Run `jobs` (in priority order) on `processes` processes; an arm waits for its dense checkpoint."""
    def finished(record: dict) -> None:
        done.append(record)
        save()  # after every run: a study cut short keeps what it finished
        print(f"[{len(done)}/{total}] {record['dataset']} {record['label']} seed {record['seed']}: "
              f"{100 * record['test_acc']:.2f}% (cpu {record['cpu_seconds']:.0f} s)", flush=True)

    fn = lambda job: pretrain if job.arm == "dense" else run_arm
    if processes <= 1:  # the priority order puts every dense run before its arms
        for job in jobs:
            finished(fn(job)(job, studies[job.dataset], out))
        return
    pending = list(jobs)
    untrained = {(j.dataset, j.seed) for j in jobs if j.arm == "dense"}
    ready = lambda j: j.arm == "dense" or (j.dataset, j.seed) not in untrained
    with ProcessPoolExecutor(processes, mp_context=multiprocessing.get_context("spawn")) as pool:
        running: dict = {}
        while pending or running:
            while len(running) < processes and (job := next((j for j in pending if ready(j)), None)):
                pending.remove(job)
                running[pool.submit(fn(job), job, studies[job.dataset], out)] = job
            finished_now, _ = wait(running, return_when=FIRST_COMPLETED)
            for future in finished_now:
                job = running.pop(future)
                untrained.discard((job.dataset, job.seed))
                finished(future.result())


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    out, start = start_study(args)
    if args.permutation_cost:
        cost = permutation_cost(out, args.datasets, args.sparsities, args.seeds)
        (out / "permutation_cost.json").write_text(json.dumps(cost, indent=1))
        print(permutation_cost_table(cost))
        return cost
    if args.from_json:
        records, meta = read_results(args.from_json)
    else:
        studies = {ds: (QUICK if args.quick else STUDIES)[ds] for ds in args.datasets}
        for ds, st in studies.items():
            print(f"{ds}: pretrain {asdict(st.pretrain)}; fine-tune {st.finetune_epochs} epochs at "
                  f"lr {st.finetune_lr}", flush=True)
        perm_arms = list(args.perm_arms)
        if perm_arms and permutation_function() is None:
            print(f"skipped {', '.join(perm_arms)}: this spre_fx has no permute_channels "
                  "(the arms run once it does)", flush=True)
            perm_arms = []
        # seed-major (a study cut short has every cell at fewer seeds); in a seed the dense run first,
        # then the long runs
        order = lambda j: (j.seed, j.dataset != "mnist", j.arm != "dense", j.base == "oneshot")
        cells = [(ds, s, nm) for ds in args.datasets for s in args.seeds for nm in args.sparsities]
        perm = lambda arms: [Job(ds, s, arm, nm) for ds, s, nm in cells for arm in arms]
        grid = [Job(ds, s, "dense") for s in args.seeds for ds in args.datasets]
        grid += [Job(ds, s, arm, nm) for ds, s, nm in cells for arm in args.arms]
        grid = sorted(grid + perm([a for a in perm_arms if a != "best+perm"]), key=order)
        records: list[dict] = []
        if args.resume and (out / "results.json").is_file():
            records, _ = read_results(out / "results.json")
            have = {(r["dataset"], r["label"], r["seed"]) for r in records}
            missing = lambda j: (j.dataset, j.label, j.seed) not in have or (
                j.arm == "dense" and not checkpoint_path(out, j.dataset, j.seed).is_file())
            grid = [j for j in grid if missing(j)]
            records = [r for r in records if r["arm"] != "dense" or not any(
                j.arm == "dense" and (j.dataset, j.seed) == (r["dataset"], r["seed"]) for j in grid)]
            print(f"resumed: {len(records)} runs kept", flush=True)
        total = len(records) + len(grid)
        print(f"{total} runs ({len(records)} done); {args.jobs} process(es)", flush=True)
        meta = {"args": {k: str(v) for k, v in vars(args).items()},
                "studies": {ds: {**asdict(st.pretrain), "finetune_epochs": st.finetune_epochs,
                                 "finetune_lr": st.finetune_lr} for ds, st in studies.items()},
                "torch": torch.__version__, "permute_channels": permutation_function() is not None,
                "complete": False}

        def save() -> None:
            write_results(out, meta, records, start)

        _execute(grid, studies, out, args.jobs, records, save, total)
        if "best+perm" in perm_arms and (best := best_finetuned(records)):
            print(f"arm (f): the best fine-tuning arm is {best}; running {best}+perm", flush=True)
            meta["best_finetuned"] = best
            have = {(r["dataset"], r["label"], r["seed"]) for r in records}
            extra = sorted((j for j in perm([f"{best}+perm"]) if (j.dataset, j.label, j.seed) not in have),
                           key=order)
            _execute(extra, studies, out, args.jobs, records, save, total + len(extra))
        meta["complete"] = True
        save()
    summary = analyse(records)
    write_summary(out, summary, meta, tables(summary))
    rec = summary["recommendation"]
    print(f"\nrecommended (protocol's rule): {rec and rec['arm']}; best fine-tuning arm by mean: "
          f"{summary['best_finetuned']}; max convert error {summary['max_convert_error']}; max permutation "
          f"error {summary['max_permutation_error']} ({summary['permuted_runs']} runs); "
          f"pairing mismatches: {summary['pairing']['mismatches'] or 'none'}")
    if summary["cells"]:
        plot_finetune_accuracy(summary, out / "finetune_accuracy.png")
        plot_finetune_differences(summary, out / "finetune_differences.png")
    print(f"wrote results.json, summary.json, tables.md and the PNGs to {out} "
          f"({time.perf_counter() - start:.0f} s)")
    return summary


if __name__ == "__main__":
    main()
