"""The `spre-fx` command line: what `spre_fx.prepare` would do to a model, without writing code.

    spre-fx plan torchvision:resnet50
    spre-fx plan timm:convnext_tiny --nm 1:4 --json
    python -m spre_fx plan mypackage.models:build_net --input-size 3 64 64

A model is named `SOURCE:NAME`: `torchvision:<name>` (torchvision.models.get_model, no weights),
`timm:<name>` (timm.create_model, pretrained=False) or `package.module:factory` (any importable
callable returning an nn.Module, called without arguments). The command builds it, prepares it
(nothing is trained or downloaded) and prints `spre_fx.report` with a zero input of
`--input-size`, then a summary: SpRe coverage of the k×k convs, the N:M share of conv/linear
weights and MACs, and the share of MACs the 2:4 kernels can run in `--dtype`. Only the public
API is used. Exit status: 0, 2 for a bad argument or an unknown model name, 1 for a model that
fails to build or prepare. docs/cli.md.
"""

from __future__ import annotations

import argparse
import difflib
import importlib
import json
import sys
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

import spre_fx

__all__ = ["main", "build_model", "summarize", "ModelNameError"]

PROG = "spre-fx"
DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


class ModelNameError(ValueError):
    """The model name does not say what to build (exit status 2, like a bad argument)."""


def _unknown(kind: str, name: str, known: Sequence[str]) -> ModelNameError:
    close = difflib.get_close_matches(name, known, n=3)
    hint = f"; did you mean {', '.join(close)}?" if close else ""
    return ModelNameError(f"unknown {kind} model '{name}'{hint}")


def build_model(spec: str) -> tuple[nn.Module, tuple[int, ...] | None]:
    """The model named `spec` (`torchvision:NAME`, `timm:NAME`, `package.module:factory`), without
    pretrained weights, and its default input size (C, H, W) when its library records one.
    `ModelNameError` for a name that names nothing; what building raises passes through."""
    source, sep, name = spec.partition(":")
    if not sep or not source or not name:
        raise ModelNameError(
            f"model '{spec}' is not SOURCE:NAME; use torchvision:resnet50, timm:convnext_tiny or "
            "package.module:factory"
        )
    if source == "torchvision":
        import torchvision.models

        known = torchvision.models.list_models()
        if name not in known:
            raise _unknown("torchvision", name, known)
        return torchvision.models.get_model(name, weights=None), None
    if source == "timm":
        import timm

        if not timm.is_model(name):
            raise _unknown("timm", name, timm.list_models())
        model = timm.create_model(name, pretrained=False)
        size = getattr(model, "pretrained_cfg", {}).get("input_size")
        return model, tuple(size) if size else None
    try:
        module = importlib.import_module(source)
    except ImportError as err:
        raise ModelNameError(f"cannot import '{source}' for model '{spec}': {err}") from err
    factory: Any = module
    for part in name.split("."):
        if not hasattr(factory, part):
            public = [n for n in dir(module) if not n.startswith("_")]
            raise _unknown(f"'{source}'", name, public)
        factory = getattr(factory, part)
    if not callable(factory):
        raise ModelNameError(f"'{spec}' is a {type(factory).__name__}, not a callable that builds a model")
    model = factory()
    if not isinstance(model, nn.Module):
        raise TypeError(f"'{spec}()' returned a {type(model).__name__}, not a torch.nn.Module")
    return model, None


def summarize(rep: spre_fx.Report) -> dict[str, Any]:
    """SpRe coverage, N:M shares of conv/linear weights and MACs, and the 2:4 kernels' MAC share,
    from a report (MAC figures need a report made with an input)."""
    kxk = [lr for lr in rep.layers if len(lr.shape) == 4 and tuple(lr.shape[2:]) != (1, 1)]
    sparse = [lr for lr in rep.layers if lr.treatment != spre_fx.Treatment.DENSE]
    weights = {lr.name: torch.Size(lr.shape).numel() for lr in rep.layers}
    macs = {lr.name: lr.kernel.macs for lr in rep.layers
            if lr.kernel is not None and lr.kernel.macs is not None}
    total_macs = sum(macs.values())
    out = {
        "layers": {t.value: rep.count(t) for t in spre_fx.Treatment},
        "spre_kxk_convs": sum(lr.treatment == spre_fx.Treatment.SPRE for lr in kxk),
        "kxk_convs": len(kxk),
        "nm_weights": sum(weights[lr.name] for lr in sparse),
        "weights": sum(weights.values()),
        "nm_macs": sum(macs.get(lr.name, 0) for lr in sparse) if total_macs else None,
        "macs": total_macs or None,
        "kernel_macs": rep.flops.sparse_macs if rep.flops is not None else None,
        "untraced": [name for name, _ in rep.untraced],
    }
    return out


def _share(part: int, whole: int) -> str:
    return f"{part / whole:.1%}" if whole else "-"


def _summary_lines(s: dict[str, Any], input_shape: tuple[int, ...], dtype: str) -> list[str]:
    shape = "x".join(map(str, input_shape))
    lines = [
        f"SpRe coverage: {s['spre_kxk_convs']} of {s['kxk_convs']} k×k convs get a SpRe branch "
        f"({_share(s['spre_kxk_convs'], s['kxk_convs'])}); layers: {s['layers']['spre']} spre, "
        f"{s['layers']['nm']} nm, {s['layers']['dense']} dense",
        f"N:M weights: {_share(s['nm_weights'], s['weights'])} of conv/linear weights "
        f"({s['nm_weights'] / 1e6:.2f} M of {s['weights'] / 1e6:.2f} M)",
    ]
    if s["macs"]:
        lines.append(f"N:M MACs: {_share(s['nm_macs'], s['macs'])} of conv/linear MACs at input {shape} "
                     f"({s['nm_macs'] / 1e9:.2f} G of {s['macs'] / 1e9:.2f} G)")
        lines.append(f"2:4 kernels ({dtype}, CUDA): {_share(s['kernel_macs'], s['macs'])} of conv/linear "
                     "MACs can run on them (the '2:4 kernel' column says why not for the others)")
    return lines


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="SpRe (Spatial Re-parameterization for N:M sparsity) for any PyTorch model.",
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    plan = commands.add_parser(
        "plan",
        help="print what spre_fx.prepare would do to a model (no weights, no training)",
        description="Build MODEL without pretrained weights, prepare it and print spre_fx.report: "
                    "per-layer treatment and why, SpRe coverage, N:M share of weights and MACs, "
                    "and whether the 2:4 kernels apply.",
        epilog="examples:\n  spre-fx plan torchvision:resnet50\n  spre-fx plan timm:convnext_tiny --nm 1:4 "
               "--json\n  spre-fx plan mypackage.models:build_net --input-size 3 64 64",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    plan.add_argument("model", metavar="MODEL",
                      help="torchvision:NAME, timm:NAME or package.module:factory (called without arguments)")
    plan.add_argument("--nm", default="2:4", metavar="N:M", help="N:M sparsity pattern (default: 2:4)")
    plan.add_argument("--input-size", type=int, nargs=3, metavar=("C", "H", "W"), default=None,
                      help="input image size for the MAC count "
                           "(default: timm's pretrained config, else 3 224 224)")
    plan.add_argument("--batch-size", type=int, default=1, metavar="B",
                      help="batch of the zero input: the 2:4 kernel advice weighs each layer's GEMM size "
                           "(default: 1)")
    plan.add_argument("--dtype", choices=sorted(DTYPES), default="float16",
                      help="judge the 2:4 kernels as if deployed in this dtype (default: float16)")
    plan.add_argument("--no-spre", action="store_true",
                      help="plain N:M everywhere (SR-STE), no SpRe branches")
    plan.add_argument("--skip", action="append", default=[], metavar="PATTERN",
                      help="leave the layers matching this fnmatch pattern dense (repeatable)")
    plan.add_argument("--json", action="store_true", help="print the report and summary as JSON")
    plan.set_defaults(handler=_plan, command_parser=plan)
    return parser


def _nm(parser: argparse.ArgumentParser, text: str) -> tuple[int, int]:
    n, sep, m = text.partition(":")
    if not (sep and n.isdigit() and m.isdigit()):
        parser.error(f"argument --nm: expected N:M such as 2:4, found '{text}'")
    return int(n), int(m)


def _plan(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    nm = _nm(parser, args.nm)
    try:
        config = spre_fx.SpReConfig(nm=nm, spre=not args.no_spre, skip=tuple(args.skip))
    except (ValueError, TypeError) as err:
        parser.error(str(err))
    try:
        model, default_size = build_model(args.model)
    except ModelNameError as err:
        parser.error(str(err))
    except Exception as err:  # the model's own code failed: say which model and why
        print(f"{PROG}: error: could not build '{args.model}': {type(err).__name__}: {err}", file=sys.stderr)
        return 1
    size = tuple(args.input_size or default_size or (3, 224, 224))
    if args.batch_size < 1:
        parser.error(f"argument --batch-size: expected a positive batch, found {args.batch_size}")
    input_shape = (args.batch_size, *size)
    try:
        prepared = spre_fx.prepare(model.eval(), config=config, inplace=True)
        with torch.no_grad():
            rep = spre_fx.report(prepared, input_size=input_shape, dtype=DTYPES[args.dtype])
    except Exception as err:
        print(f"{PROG}: error: could not prepare '{args.model}' at input {input_shape}: "
              f"{type(err).__name__}: {err}", file=sys.stderr)
        return 1
    summary = summarize(rep)
    if args.json:
        json.dump({"model": args.model, "input_size": list(input_shape), "dtype": args.dtype,
                   "summary": summary, "report": rep.to_dict()}, sys.stdout, default=str)
        sys.stdout.write("\n")
    else:
        print(f"{args.model}: {nm[0]}:{nm[1]}{'' if config.spre else ' (no SpRe)'}")
        print(rep)
        print("\n".join(_summary_lines(summary, input_shape, args.dtype)))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """The `spre-fx` entry point; returns the exit status."""
    args = _parser().parse_args(argv)
    return args.handler(args, args.command_parser)
