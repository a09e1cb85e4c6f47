"""How much |w| N:M keeps with and without `spre_fx.permute_channels`, how long the search takes,
and how many channels it covers, on models nobody here wrote.

    python benchmarks/permutation.py                       # the table of docs/benchmarks.md
    python benchmarks/permutation.py --models tv:resnet18 --nm 2:4 --no-trained

Per model and N:M: the share of Σ|w| over the layers `prepare` makes N:M that magnitude N:M
keeps (read from the masks of `spre_fx.masks.nm_mask`, not from the search's bookkeeping),
before and after permutation; the gain in points; the wall time of `permute_channels`
(tracing, discovery, search, application) and its CPU time (wall time on a shared machine
drifts with the other load; CPU time much less); coverage, the share of the N:M layers' input
channels whose order was searched and changed; and the groups permuted / all groups.

Models: torchvision and timm classifiers, a torchvision detection backbone (with its FPN) and
a Hugging Face transformers ResNet, all at random initialisation (no weights can be downloaded
here): their magnitudes are i.i.d. within a layer, so any order is as good as another up to
chance, and the gains are a floor. Trained weights have structure (channels that matter more)
that permutation exploits; the `trained-digits` rows are the dense ResNet of
examples/digits.py trained on scikit-learn's digits here (`--no-trained` skips them).
`--exhaustive` also compares the search with the best of every split of small groups (8-16
channels); `--asp` also scores the search on the random 128 x 64 matrix of NVIDIA ASP's permutation README
(efficacy: the share of the gap between the default order and the per-row 50 % bound it closes).
"""

from __future__ import annotations

import argparse
import itertools
import sys
import time
import warnings
from pathlib import Path
from types import SimpleNamespace

import torch
from torch import nn

import spre_fx
from spre_fx.channel_search import nm_kept, search_permutation
from spre_fx.masks import nm_mask
from spre_fx.plan import Treatment

DEFAULT_MODELS = ["tv:resnet18", "tv:resnet50", "tv:mobilenet_v2", "tv:regnet_y_400mf", "tv:convnext_tiny",
                  "timm:efficientnet_b0", "timm:convnext_atto", "tv-det:fasterrcnn_resnet50_fpn",
                  "hf:resnet-50"]


def build(spec: str) -> nn.Module:
    source, name = spec.split(":", 1)
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if source == "tv":
            import torchvision

            return torchvision.models.get_model(name, weights=None)
        if source == "timm":
            import timm

            return timm.create_model(name, pretrained=False)
        if source == "tv-det":  # the backbone with its FPN, as the detector calls it
            import torchvision

            return torchvision.models.get_model(name, weights=None, weights_backbone=None).backbone
        if source == "hf":
            from transformers import ResNetConfig, ResNetForImageClassification

            return ResNetForImageClassification(ResNetConfig())  # ResNet-50's layout
    raise ValueError(f"unknown model source in {spec!r}: tv, timm, tv-det or hf")


def trained_digits(width: int, epochs: int) -> nn.Module:
    """The dense ResNet of examples/digits.py, trained there on the digits (seed 0)."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
    import digits

    args = SimpleNamespace(epochs=epochs, batch=64, lr=0.05, warmup_epochs=2, weight_decay=5e-4)
    data = digits.load_data()
    run = digits.train(digits.Method("dense", "dense"), 0, data, args, [], eval_each_epoch=False,
                       build=lambda: digits.DigitsResNet(width))
    run.model.eval()
    print(f"# trained-digits w{width}: dense test accuracy {digits.accuracy(run.model, *data[2:]):.1%}")
    return run.model


def nm_layers(model: nn.Module, n: int, m: int) -> list[str]:
    """The layers `prepare` makes N:M (the same names before and after permutation)."""
    plan = spre_fx.plan_of(spre_fx.prepare(model, (n, m), spre=False))
    return [lp.name for lp in plan.layers if lp.treatment != Treatment.DENSE]


def nm_share(model: nn.Module, names: list[str], n: int, m: int) -> float:
    kept = total = 0.0
    for name in names:
        w = model.get_submodule(name).weight.detach().abs().double()
        kept += float(w[nm_mask(w, n, m)].sum())
        total += float(w.sum())
    return kept / total if total else float("nan")


def row(label: str, model: nn.Module, n: int, m: int, rounds: int) -> str:
    names = nm_layers(model, n, m)
    before = nm_share(model, names, n, m)
    start, cpu = time.perf_counter(), time.process_time()
    permuted = spre_fx.permute_channels(model, (n, m), rounds=rounds)
    seconds, cpu = time.perf_counter() - start, time.process_time() - cpu
    after = nm_share(permuted, names, n, m)
    rec = spre_fx.permutation_of(permuted)
    applied = sum(g.applied for g in rec.groups)
    return (f"| {label} | {n}:{m} | {before:.2%} | {after:.2%} | {100 * (after - before):+.2f} | "
            f"{seconds:.1f} / {cpu:.1f} | {rec.coverage:.0%} | {applied}/{len(rec.groups)} |")


def asp_matrix(rounds: int) -> None:
    """Efficacy on ASP README's problem: a random 128-row, 64-column matrix, 2:4."""
    print("\n| matrix (128 x 64, seed) | default 2:4 | permuted | 50 % rows bound | efficacy | s |")
    print("|---|---|---|---|---|---|")
    for seed in range(3):
        g = torch.Generator().manual_seed(seed)
        for kind, a in (("abs(normal)", torch.randn(128, 64, generator=g).abs()),
                        ("uniform", torch.rand(128, 64, generator=g))):
            start = time.perf_counter()
            perm = search_permutation(a, 2, 4, rounds=rounds)
            seconds = time.perf_counter() - start
            base, found = nm_kept(a, 2, 4), nm_kept(a, 2, 4, perm)
            bound = float(a.topk(32, dim=1).values.sum())
            print(f"| {kind}, {seed} | {base:.1f} | {found:.1f} | {bound:.1f} | "
                  f"{(found - base) / (bound - base):.1%} | {seconds:.2f} |")


def best_split(a: torch.Tensor, n: int, m: int) -> float:
    """The most N:M can keep of `a` over every way to split its columns into groups of M."""
    def splits(cols: tuple[int, ...]):
        if not cols:
            yield ()
            return
        for rest in itertools.combinations(cols[1:], m - 1):
            group = (cols[0], *rest)
            for tail in splits(tuple(c for c in cols if c not in group)):
                yield group + tail
    return max(nm_kept(a, n, m, torch.tensor(order)) for order in splits(tuple(range(a.shape[1]))))


def exhaustive(rounds: int) -> None:
    """The search against the best split, on small random groups with column structure."""
    print("\n| N:M | channels | rows | cases | gain found / best gain (sum) | worst case |")
    print("|---|---|---|---|---|---|")
    for n, m, c in ((2, 4, 8), (2, 4, 12), (1, 4, 12), (1, 8, 16)):
        found = best = 0.0
        worst = 1.0
        for seed in range(6):
            g = torch.Generator().manual_seed(seed)
            a = torch.rand(24, c, generator=g, dtype=torch.float64)
            a *= torch.rand(1, c, generator=g, dtype=torch.float64)
            base = nm_kept(a, n, m)
            gain = nm_kept(a, n, m, search_permutation(a, n, m, rounds=rounds)) - base
            top = best_split(a, n, m) - base
            found, best, worst = found + gain, best + top, min(worst, gain / top if top else 1.0)
        print(f"| {n}:{m} | {c} | 24 | 6 | {found / best:.1%} | {worst:.1%} |")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", nargs="*", default=DEFAULT_MODELS, help="source:name (tv, timm, tv-det, hf)")
    p.add_argument("--nm", nargs="+", default=["2:4", "1:4", "1:8"])
    p.add_argument("--rounds", type=int, default=12, help="search rounds per group (permute_channels)")
    p.add_argument("--no-trained", action="store_true", help="skip the trained digits nets")
    p.add_argument("--digits-epochs", type=int, default=30)
    p.add_argument("--asp", action="store_true", help="also ASP README's random-matrix comparison")
    p.add_argument("--exhaustive", action="store_true", help="also the search against exhaustive splits")
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    nms = [tuple(int(v) for v in s.split(":")) for s in args.nm]
    print(f"# torch {torch.__version__}, {args.threads} thread(s), rounds={args.rounds}")
    print("| model | N:M | kept, default order | kept, permuted | gain (points) | wall / CPU s | coverage "
          "| groups |")
    print("|---|---|---|---|---|---|---|---|")
    models = [(spec, lambda spec=spec: build(spec)) for spec in args.models]
    if not args.no_trained:
        models += [(f"trained-digits w{w}", lambda w=w: trained_digits(w, args.digits_epochs))
                   for w in (16, 32)]
    for label, make in models:
        try:
            model = make().eval()
        except ImportError as err:
            print(f"| {label} | skipped: {err} |")
            continue
        for n, m in nms:
            print(row(label, model, n, m, args.rounds), flush=True)
    if args.asp:
        asp_matrix(args.rounds)
    if args.exhaustive:
        exhaustive(args.rounds)


if __name__ == "__main__":
    main()
