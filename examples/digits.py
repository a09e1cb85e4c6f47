"""SpRe vs SR-STE vs unstructured sparsity on real data: scikit-learn's 8x8 handwritten digits.

A small ResNet (3x3 conv -> BN -> ReLU blocks) is trained from scratch with every method and
several seeds, under one optimizer and schedule (docs/method.md §5 recipe, scaled down):

    dense             no sparsity
    unstructured      layer-wise magnitude pruning at 50% (gradual, cubic ramp) of the layers
                      spre_fx sparsifies; `unstructured-75` (also run by default, the 1:4
                      reference) etc. set another rate
    srste-N:M         spre_fx.prepare(model, nm=(N, M), spre=False) + MaskScheduler (SR-STE)
    spre-N:M          spre_fx.prepare(model, nm=(N, M)) + MaskScheduler (SpRe)

Every model then has its BatchNorm statistics re-estimated on the training images under its
final masks (`spre_fx.recalibrate_bn`), is converted (`spre_fx.convert`), checked
(`spre_fx.verify`) and scored as deployed. One table is printed, then the paired differences
SpRe − SR-STE and unstructured − SR-STE per N:M with 95 % t intervals over seeds (every method
of a seed starts from the same weights and sees the same batches); heatmaps of the per-tap
sparsity of the 3x3 convs and the training curves go to the output folder. The controlled,
larger comparison is examples/study.py (docs/results.md).

Eval-mode test accuracy of the N:M runs jumps from epoch to epoch while the LR is high: the
masks move at every step (about 1% of the weights flip per step early on, on a net this small)
and the BatchNorm running statistics lag behind them; it settles as the cosine LR anneals, and
the recalibration before convert removes what is left of the lag.

    make demo
    PYTHONPATH=. .venv/bin/python examples/digits.py --seeds 0 --epochs 10 --methods dense spre-2:4
"""

from __future__ import annotations

import argparse
import json
import math
import re
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from matplotlib.figure import Figure
from paired import paired_difference, share_closed
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from torch import Tensor, nn
from torch.nn import functional as F
from tqdm import tqdm

import spre_fx
from spre_fx.masks import magnitude_mask, spatial_sparsity

# unstructured-75 is the same-rate reference for the 1:4 methods, as unstructured (50%) is for 2:4.
DEFAULT_METHODS = [
    "dense", "unstructured", "srste-2:4", "spre-2:4", "unstructured-75", "srste-1:4", "spre-1:4",
]


# --------------------------------------------------------------------------- data and model
def load_data() -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """The 1,797 digits as [N, 1, 8, 8] floats in [0, 1]; fixed stratified 70/30 split."""
    digits = load_digits()
    x = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(digits.target, dtype=torch.long)
    idx_train, idx_test = train_test_split(
        torch.arange(len(y)).numpy(), test_size=0.3, random_state=0, stratify=y.numpy()
    )
    return x[idx_train], y[idx_train], x[idx_test], y[idx_test]


class BasicBlock(nn.Module):
    """conv3x3 -> BN -> ReLU -> conv3x3 -> BN, plus identity (or 1x1 conv -> BN) shortcut, ReLU."""

    def __init__(self, cin: int, cout: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = nn.Identity()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: Tensor) -> Tensor:
        y = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(y)) + self.shortcut(x))


class DigitsResNet(nn.Module):
    """Stem conv 1->16 (kept dense by spre_fx), blocks at 16 and 32 channels, pool, linear."""

    def __init__(self, width: int = 16, num_classes: int = 10) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(1, width, 3, 1, 1, bias=False), nn.BatchNorm2d(width), nn.ReLU())
        self.layer1 = BasicBlock(width, width)
        self.layer2 = BasicBlock(width, 2 * width, stride=2)
        self.fc = nn.Linear(2 * width, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        x = self.layer2(self.layer1(self.stem(x)))
        return self.fc(x.mean(dim=(2, 3)))


class CifarResNet(nn.Module):
    """CIFAR-style ResNet: dense stem conv, three stages of BasicBlocks at width, 2·width and
    4·width channels (strides 1, 2, 2), global pool, linear."""

    def __init__(self, width: int = 8, blocks: int = 1, num_classes: int = 10, in_channels: int = 1) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(in_channels, width, 3, 1, 1, bias=False), nn.BatchNorm2d(width),
                                  nn.ReLU())
        stages, cin = [], width
        for i, stride in enumerate((1, 2, 2)):
            cout = width * 2**i
            stages.append(nn.Sequential(*(BasicBlock(cin if b == 0 else cout, cout, stride if b == 0 else 1)
                                          for b in range(blocks))))
            cin = cout
        self.stages = nn.Sequential(*stages)
        self.fc = nn.Linear(cin, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(self.stages(self.stem(x)).mean(dim=(2, 3)))


# --------------------------------------------------------------------------- methods
@dataclass(frozen=True)
class Method:
    name: str
    kind: str  # "dense", "unstructured", "srste" or "spre"
    rate: float = 0.0  # target sparsity of the sparsified layers
    nm: tuple[int, int] | None = None


def parse_method(name: str) -> Method:
    if name == "dense":
        return Method(name, "dense")
    if m := re.fullmatch(r"unstructured(?:-(\d+))?", name):
        pct = int(m.group(1) or 50)
        if not 0 < pct < 100:
            raise argparse.ArgumentTypeError(f"{name}: the rate must be a percentage in (0, 100)")
        return Method(name, "unstructured", rate=pct / 100)
    if m := re.fullmatch(r"(srste|spre)-(\d+):(\d+)", name):
        n, mm = int(m.group(2)), int(m.group(3))
        if not 1 <= n < mm:
            raise argparse.ArgumentTypeError(f"{name}: need 1 <= N < M")
        return Method(name, m.group(1), rate=1 - n / mm, nm=(n, mm))
    raise argparse.ArgumentTypeError(
        f"unknown method {name!r}: use dense, unstructured[-PCT], srste-N:M or spre-N:M"
    )


def sparsified_layers(model: nn.Module) -> list[str]:
    """The layers spre_fx gives N:M (all but the dense stem): the unstructured baseline prunes these."""
    rep = spre_fx.report(spre_fx.prepare(model, nm=(2, 4), spre=False))
    return [lr.name for lr in rep.layers if lr.treatment != "dense"]


class GradualMagnitudePruning:
    """Layer-wise unstructured magnitude pruning with the cubic ramp of Zhu & Gupta (2017).

    The rate goes 0 -> `rate` between optimizer steps `start` and `end`; masks are recomputed
    from the weights' magnitudes at every step of the ramp, and re-applied after every step.
    """

    def __init__(self, model: nn.Module, names: list[str], rate: float, start: int, end: int) -> None:
        modules = dict(model.named_modules())
        self.weights = [modules[n].weight for n in names]
        self.masks = [torch.ones_like(w, dtype=torch.bool) for w in self.weights]
        self.rate, self.start, self.end = rate, start, max(end, start + 1)

    def rate_at(self, step: int) -> float:
        progress = min(max((step - self.start) / (self.end - self.start), 0.0), 1.0)
        return self.rate * (1.0 - (1.0 - progress) ** 3)

    @torch.no_grad()
    def after_step(self, step: int) -> None:
        if self.start <= step <= self.end:
            rate = self.rate_at(step)
            self.masks = [magnitude_mask(w, rate) for w in self.weights]
        for w, mask in zip(self.weights, self.masks):
            w.mul_(mask)


# --------------------------------------------------------------------------- training
@dataclass
class Run:
    method: Method
    seed: int
    model: nn.Module  # prepared model for N:M methods, plain model otherwise
    losses: list[float] = field(default_factory=list)  # mean training loss per epoch
    accs: list[float] = field(default_factory=list)  # test accuracy per epoch (eval mode)
    deployed: nn.Module | None = None
    test_acc: float = float("nan")
    convert_error: float | None = None
    sparsity: float = 0.0
    nonzero: int = 0
    total: int = 0


@torch.no_grad()
def accuracy(model: nn.Module, x: Tensor, y: Tensor) -> float:
    was_training = model.training
    model.eval()
    acc = (model(x).argmax(1) == y).float().mean().item()
    model.train(was_training)
    return acc


def lr_at(step: int, total: int, warmup: int, peak: float) -> float:
    """Linear warm-up to `peak`, then cosine to 0 (per optimizer step)."""
    if step < warmup:
        return peak * (step + 1) / warmup
    return 0.5 * peak * (1.0 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))


def train(method: Method, seed: int, data, args, layers: list[str], bar: tqdm | None = None, *,
          build: Callable[[], nn.Module] | None = None, schedule: dict | None = None,
          adapt: Callable[[nn.Module], None] | None = None, prepare_options: dict | None = None,
          eval_each_epoch: bool = True, on_batch: Callable[[Tensor], None] | None = None) -> Run:
    """Train one model from scratch: seed -> main weights, then its own generator -> batch order.

    build: the unprepared model (default DigitsResNet(args.width)), built right after
    torch.manual_seed(seed); schedule: MaskSchedule fields; adapt(prepared): a change applied
    after prepare (the study's ablations); on_batch(indices): sees every batch (pairing checks).
    """
    x_train, y_train, x_test, y_test = data
    torch.manual_seed(seed)
    model: nn.Module = build() if build is not None else DigitsResNet(args.width)
    if method.kind in ("srste", "spre"):
        model = spre_fx.prepare(model, nm=method.nm, spre=method.kind == "spre", **(prepare_options or {}))
        if adapt is not None:
            adapt(model)
    opt = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9, weight_decay=args.weight_decay)
    steps_per_epoch = math.ceil(len(x_train) / args.batch)
    total = args.epochs * steps_per_epoch
    warmup = min(total, args.warmup_epochs * steps_per_epoch)
    masks = pruner = None
    if method.kind in ("srste", "spre"):  # N:M (and S) masks move after every step unless `schedule` says
        masks = spre_fx.MaskScheduler(model, opt, **(schedule or {}))
    elif method.kind == "unstructured":  # ramp from the end of the LR warm-up to 60% of training
        start = min(warmup, total // 4)
        pruner = GradualMagnitudePruning(model, layers, method.rate, start, int(0.6 * total))
    loss_fn = nn.CrossEntropyLoss(label_smoothing=0.1)
    gen = torch.Generator().manual_seed(seed)
    run = Run(method, seed, model)
    step = 0
    for _ in range(args.epochs):
        model.train()
        order = torch.randperm(len(x_train), generator=gen)
        loss_sum = 0.0
        for i in range(0, len(order), args.batch):
            idx = order[i : i + args.batch]
            if on_batch is not None:
                on_batch(idx)
            for group in opt.param_groups:
                group["lr"] = lr_at(step, total, warmup, args.lr)
            loss = loss_fn(model(x_train[idx]), y_train[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            step += 1
            if pruner is not None:
                pruner.after_step(step)
            loss_sum += loss.item() * len(idx)
        run.losses.append(loss_sum / len(x_train))
        if eval_each_epoch:
            run.accs.append(accuracy(model, x_test, y_test))
        if bar is not None:
            acc = f" acc {run.accs[-1]:.1%}" if run.accs else ""
            bar.set_postfix_str(f"{method.name} seed {seed} loss {run.losses[-1]:.3f}{acc}")
            bar.update()
    if masks is not None:
        masks.remove()
    return run


def deploy(run: Run, layers: list[str], x_test: Tensor, y_test: Tensor, recalibrate: Tensor | None = None,
           batch: int = 256, before_convert: Callable[[nn.Module], None] | None = None) -> None:
    """Re-estimate BatchNorm statistics on `recalibrate` (training images) under the final masks
    if given, fold BatchNorms (and SpRe branches) into the convs, verify, score and count the
    deployed model."""
    model = run.model.eval()
    if recalibrate is not None:
        spre_fx.recalibrate_bn(model, recalibrate.split(batch))
    if before_convert is not None:
        before_convert(model)
    if run.method.kind in ("srste", "spre"):
        deployed = spre_fx.convert(model)
        run.convert_error = spre_fx.verify(model, deployed, x_test[:256]).output_error
    else:  # dense and unstructured: the same BN folding, with no layer sparsified
        deployed = spre_fx.convert(spre_fx.prepare(model, include=()))
    deployed.eval()
    run.deployed = deployed
    run.test_acc = accuracy(deployed, x_test, y_test)
    modules = dict(deployed.named_modules())
    zeros = sum(int((modules[n].weight == 0).sum()) for n in layers)
    run.sparsity = zeros / sum(modules[n].weight.numel() for n in layers)
    params = list(deployed.parameters())
    run.nonzero = sum(int(p.count_nonzero()) for p in params)
    run.total = sum(p.numel() for p in params)


# --------------------------------------------------------------------------- table
def summarize(runs: list[Run], methods: list[Method]) -> tuple[str, list[dict]]:
    rows, records = [], []
    for method in methods:
        rs = [r for r in runs if r.method == method]
        accs = [100 * r.test_acc for r in rs]
        std = statistics.stdev(accs) if len(accs) > 1 else 0.0
        errs = [r.convert_error for r in rs if r.convert_error is not None]
        rec = {
            "method": method.name,
            "seeds": [r.seed for r in rs],
            "test_acc": [r.test_acc for r in rs],
            "test_acc_mean": statistics.mean(accs) / 100,
            "test_acc_std": std / 100,
            "sparsity": statistics.mean(r.sparsity for r in rs),
            "params_nonzero": round(statistics.mean(r.nonzero for r in rs)),
            "params_total": rs[0].total,
            "max_convert_error": max(errs) if errs else None,
        }
        records.append(rec)
        rows.append((
            method.name,
            f"{statistics.mean(accs):.2f} ± {std:.2f}",
            f"{rec['sparsity']:.1%}",
            f"{rec['params_nonzero']:,} / {rec['params_total']:,}",
            "-" if not errs else f"{max(errs):.1e}",
        ))
    n = len({r.seed for r in runs})
    head = ("method", f"test acc % (mean ± std, {n} seed{'s' * (n > 1)})", "sparsity*",
            "params at inference (nonzero / total)", "max convert error")
    widths = [max(len(r[i]) for r in [head, *rows]) for i in range(len(head))]
    fmt = lambda r: "  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip()
    lines = [fmt(head), "-" * len(fmt(head)), *map(fmt, rows)]
    lines.append("* zeros in the weights of the sparsified layers (every conv and linear but the dense")
    lines.append("  stem) of the deployed model: BatchNorms and SpRe branches folded by spre_fx.convert;")
    lines.append("  accuracy of the deployed model; convert error: spre_fx.verify's relative output error.")
    return "\n".join(lines), records


def paired_summary(runs: list[Run], methods: list[Method]) -> tuple[list[str], list[dict]]:
    """SpRe − SR-STE and unstructured − SR-STE per N:M, paired by seed (same main-branch init and
    batch order), with 95 % t intervals; and the share of a significant gap that SpRe closes."""
    acc = {m: {r.seed: r.test_acc for r in runs if r.method == m} for m in methods}
    lines = ["paired differences of deployed test accuracy, percentage points: mean [95% CI], t over seeds"]
    records = []
    for nm in dict.fromkeys(m.nm for m in methods if m.nm is not None):
        find = lambda kind, nm=nm: next((m for m in methods if m.kind == kind and (
            m.nm == nm if kind != "unstructured" else abs(m.rate - (1 - nm[0] / nm[1])) < 1e-9)), None)
        srste, spre, unstructured = find("srste"), find("spre"), find("unstructured")
        if srste is None:
            continue
        for other in (spre, unstructured):
            if other is None:
                continue
            diff = paired_difference(acc[other], acc[srste])
            if diff.n < 2:
                lines.append(f"  {other.name} − {srste.name}: {100 * diff.mean:+.2f} (one seed: no interval)")
                continue
            verdict = "significant" if diff.significant else "not significant"
            lines.append(f"  {other.name} − {srste.name}: {diff.fmt()} ({diff.n} seeds; {verdict})")
            records.append({"a": other.name, "b": srste.name, "mean": diff.mean,
                            "ci95": [diff.low, diff.high], "n": diff.n})
        if spre is not None and unstructured is not None:
            share = share_closed(acc[unstructured], acc[srste], acc[spre])
            lines.append(f"  share of the {unstructured.name} − {srste.name} gap closed by {spre.name}: " + (
                f"{share:.0%}" if share is not None else "- (the gap is not significant)"))
    if len(lines) == 1:
        lines.append("  (needs an srste-N:M method and a spre-N:M or same-rate unstructured one)")
    return lines, records


# --------------------------------------------------------------------------- figures
def _heatmap(ax, values: Tensor, title: str, outline: Tensor | None = None):
    im = ax.imshow(values.numpy(), vmin=0.0, vmax=1.0, cmap="viridis")
    for (h, w), v in zip(torch.cartesian_prod(*map(torch.arange, values.shape)).tolist(), values.flatten()):
        ax.text(w, h, f"{v:.2f}", ha="center", va="center", fontsize=7, color="w" if v < 0.6 else "k")
        if outline is not None and outline[h, w]:
            ax.add_patch(_rect(h, w))
    ax.set_title(title, fontsize=8)
    ax.set_xticks([])
    ax.set_yticks([])
    return im


def _rect(h: int, w: int):
    from matplotlib.patches import Rectangle

    return Rectangle((w - 0.5, h - 0.5), 1, 1, fill=False, edgecolor="red", linewidth=2)


def _first(runs: list[Run], keep) -> Run | None:
    return next((r for r in sorted(runs, key=lambda r: r.seed) if keep(r.method)), None)


def _taps(model: nn.Module, names: list[str]) -> list[Tensor]:
    """s(h, w) of the non-zero pattern of each named conv's weight."""
    modules = dict(model.named_modules())
    return [spatial_sparsity(modules[name].weight != 0) for name in names]


def plot_spatial(runs: list[Run], nm: tuple[int, int], path: Path) -> bool:
    """Per-tap sparsity s(h, w) of the SpRe convs: unstructured vs N:M vs SpRe (lowest seed)."""
    n, m = nm
    rate = 1 - n / m
    spre = _first(runs, lambda k: k.kind == "spre" and k.nm == nm)
    if spre is None:
        return False
    srste = _first(runs, lambda k: k.kind == "srste" and k.nm == nm)
    unstructured = _first(runs, lambda k: k.kind == "unstructured" and abs(k.rate - rate) < 1e-9)
    layers = [lr for lr in spre_fx.report(spre.model).layers if lr.treatment == "spre"]
    names = [lr.name for lr in layers]
    modules = dict(spre.model.named_modules())
    spatial = [modules[name].spatial_mask for name in names]

    # (title, per-layer s(h, w), per-layer taps to outline in red)
    columns = []
    if unstructured is not None:
        title = f"unstructured {rate:.0%}\n(trained, kept weights)"
        columns.append((title, _taps(unstructured.model, names), None))
    if srste is not None:
        columns.append((f"SR-STE {n}:{m}\n(deployed)", _taps(srste.deployed, names), None))
    columns.append((f"SpRe {n}:{m}\n(deployed: still {n}:{m})", _taps(spre.deployed, names), None))
    columns.append((
        f"SpRe: reference s_U of unstructured\n{rate:.0%} on latent W (red: S = s_U < {rate:.0%})",
        [torch.tensor(lr.unstructured_spatial_sparsity) for lr in layers],
        [torch.tensor(lr.spatial_mask) for lr in layers],
    ))
    columns.append((
        "SpRe extra branch support\nnm_mask & S (red: S)",
        [spatial_sparsity(modules[name].nm_mask & s) for name, s in zip(names, spatial)],
        spatial,
    ))

    fig = Figure(figsize=(2.3 * len(columns) + 1.2, 2.1 * len(layers) + 0.8), layout="constrained")
    axes = fig.subplots(len(layers), len(columns), squeeze=False)
    im = None
    for r, lr in enumerate(layers):
        for c, (title, values, outlines) in enumerate(columns):
            outline = None if outlines is None else outlines[r]
            im = _heatmap(axes[r][c], values[r].float(), title if r == 0 else "", outline)
        axes[r][0].set_ylabel(f"{lr.name} ({'x'.join(map(str, lr.shape))})", fontsize=8)
    fig.colorbar(im, ax=axes, shrink=0.6, label="sparsity s(h, w) = 1 - mean over (o, c) of the mask")
    fig.suptitle(f"Per-tap sparsity of the 3x3 convs, {n}:{m} (seed {spre.seed}): N:M is flat; SpRe's extra "
                 "branch sits on the taps unstructured pruning keeps denser than average", fontsize=9)
    fig.savefig(path, dpi=120, bbox_inches="tight", pad_inches=0.1)
    return True


def plot_curves(runs: list[Run], methods: list[Method], path: Path) -> None:
    fig = Figure(figsize=(11, 4), layout="constrained")
    ax_loss, ax_acc = fig.subplots(1, 2)
    for method in methods:
        rs = [r for r in runs if r.method == method]
        epochs = range(1, len(rs[0].losses) + 1)
        ax_loss.plot(epochs, torch.tensor([r.losses for r in rs]).mean(0).numpy(), label=method.name)
        ax_acc.plot(epochs, 100 * torch.tensor([r.accs for r in rs]).mean(0).numpy(), label=method.name)
    ax_loss.set(xlabel="epoch", ylabel="training loss (label smoothing 0.1)",
                title="training loss, mean over seeds")
    ax_acc.set(xlabel="epoch", ylabel="test accuracy % (eval mode)", title="test accuracy, mean over seeds")
    ax_acc.set_ylim(80, 100)
    for ax in (ax_loss, ax_acc):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.savefig(path, dpi=120, bbox_inches="tight", pad_inches=0.1)


# --------------------------------------------------------------------------- main
def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--methods", nargs="+", type=parse_method, metavar="METHOD", default=DEFAULT_METHODS,
                   help="dense, unstructured[-PCT], srste-N:M, spre-N:M")
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2], help="one run per method and seed")
    p.add_argument("--epochs", type=int, default=40, help="training epochs of every run")
    p.add_argument("--width", type=int, default=8,
                   help="channels of the stem and first block (twice that in the second block)")
    p.add_argument("--batch", type=int, default=64, help="batch size")
    p.add_argument("--lr", type=float, default=0.05, help="peak learning rate (SGD, momentum 0.9)")
    p.add_argument("--warmup-epochs", type=int, default=2, help="linear LR warm-up before the cosine decay")
    p.add_argument("--weight-decay", type=float, default=5e-4)
    p.add_argument("--threads", type=int, default=1,
                   help="torch.set_num_threads; for these tiny tensors 1 is faster than 2, and far faster "
                   "on a machine shared with other work")
    p.add_argument("--out", type=Path, default=Path("out/digits"),
                   help="folder for the PNGs and results.json")
    p.add_argument("--no-progress", action="store_true", help="no tqdm progress bar")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> list[dict]:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    methods = list(dict.fromkeys(parse_method(m) if isinstance(m, str) else m for m in args.methods))
    data = load_data()
    x_test, y_test = data[2], data[3]
    bad = [m.name for m in methods if m.nm is not None and args.width % m.nm[1]]
    if args.width % 4 or bad:
        raise SystemExit(f"--width must be a multiple of 4 and of every M ({', '.join(bad)})")
    layers = sparsified_layers(DigitsResNet(args.width))
    print(f"digits: {len(data[0])} train / {len(x_test)} test images 1x8x8; {len(methods)} methods x "
          f"{len(args.seeds)} seeds x {args.epochs} epochs; sparsified layers: {', '.join(layers)}",
          flush=True)

    runs = []
    # disable=None: no bar when stderr is not a terminal (a log file); one line per run instead.
    with tqdm(total=len(methods) * len(args.seeds) * args.epochs, unit="epoch", file=sys.stderr,
              disable=True if args.no_progress else None, dynamic_ncols=True) as bar:
        for method in methods:
            for seed in args.seeds:
                bar.set_description(f"{method.name} seed {seed}")
                runs.append(train(method, seed, data, args, layers, bar))
                if bar.disable and not args.no_progress:
                    print(f"{method.name} seed {seed}: final eval acc {runs[-1].accs[-1]:.2%}", flush=True)
    for run in runs:
        deploy(run, layers, x_test, y_test, recalibrate=data[0])

    table, records = summarize(runs, methods)
    print()
    print(table)
    lines, paired = paired_summary(runs, methods)
    print()
    print("\n".join(lines))

    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    pngs = []
    for nm in dict.fromkeys(m.nm for m in methods if m.nm is not None):
        path = out / f"spatial_sparsity_{nm[0]}-{nm[1]}.png"
        if plot_spatial(runs, nm, path):
            pngs.append(path)
    plot_curves(runs, methods, out / "training_curves.png")
    pngs.append(out / "training_curves.png")
    (out / "results.json").write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()},
                                                  "results": records, "paired": paired}, indent=2))
    print(f"\n{len(runs)} runs in {time.perf_counter() - start:.0f} s; wrote {len(pngs)} PNGs and "
          f"results.json to {out}")
    return records


if __name__ == "__main__":
    main()
