"""Discovery: which layers get SpRe, plain N:M or nothing, and why.

The fx graphs of both modes (spre_fx/tracing.py, so that branches on `self.training` are
both seen) give every module's calls and data flow. Conv→BN pairs are read from data flow, with the
preconditions that make the rewrite safe (the checks `torch.fx.experimental.optimization.fuse`
lacks: a conv or BN module called from more than one place is never paired).
"""

from __future__ import annotations

import fnmatch
import warnings
from collections import defaultdict
from typing import Any

from torch import nn
from torch.nn.modules.conv import _ConvNd

from .config import SpReConfig
from .module_tree import class_name
from .plan import LayerPlan, Plan, Treatment
from .registry import norm_spec
from .tracing import ModeFlow, is_layer, trace_flows

__all__ = ["discover"]

_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_NORM_FOR_CONV = {nn.Conv1d: nn.BatchNorm1d, nn.Conv2d: nn.BatchNorm2d, nn.Conv3d: nn.BatchNorm3d}
_STOCK_FORWARD = {nn.Conv1d.forward, nn.Conv2d.forward, nn.Conv3d.forward, nn.Linear.forward}


def _pair(conv: str, flows: list[ModeFlow], modules: dict[str, nn.Module]) -> tuple[str | None, str]:
    """The BatchNorm `conv` may be paired with in every mode, else None and the reason."""
    bn = None
    for flow in flows:
        if flow.calls[conv] == 0:
            continue  # not called in this mode (e.g. an auxiliary head in eval)
        if flow.calls[conv] > 1:
            return None, f"called from {flow.calls[conv]} places in the forward"
        cand, why = flow.follows.get(conv, (None, "never called in the traced forward"))
        if cand is None:
            return None, why
        if flow.calls[cand] > 1:
            return None, f"its BatchNorm '{cand}' is called from {flow.calls[cand]} places"
        for mod in (conv, cand):
            if mod in flow.unseen_alias:
                return None, (f"'{mod}' is also registered as '{flow.unseen_alias[mod]}', "
                              "where fx does not see how it is called")
            if mod in flow.inside:
                return None, f"'{mod}' is also used inside '{flow.inside[mod]}', which fx does not enter"
        if flow.attr_reads[conv] or flow.attr_reads[cand]:
            return None, "its parameters are read directly elsewhere in the forward"
        if bn is not None and cand != bn:
            return None, f"feeds '{bn}' in training but '{cand}' in eval mode"
        bn = cand
    if bn is None:
        if any(f.calls[conv] for f in flows):
            return None, "never called in the traced forward"
        return None, "not seen by fx (inside a module that does not trace or a registered leaf)"
    norm, layer = modules[bn], modules[conv]
    if norm_spec(norm) is None:
        return None, (
            f"{class_name(type(norm))} '{bn}' overrides forward; declare how it splits with "
            "spre_fx.register_norm"
        )
    if not isinstance(layer, _CONVS):
        return None, f"{class_name(type(layer))} is not folded"
    base = next(c for c in _CONVS if isinstance(layer, c))
    other_dims = [n for c, n in _NORM_FOR_CONV.items() if c is not base]
    if isinstance(norm, tuple(other_dims)):  # dimension-agnostic norms (SyncBN, _BatchNormXd) pass
        return None, f"'{bn}' ({class_name(type(norm))}) does not match a {base.__name__}"
    if getattr(norm, "running_mean", None) is None:
        return None, f"'{bn}' keeps no running statistics, so it cannot be folded"
    if norm.running_mean.numel() != layer.out_channels:
        return None, f"'{bn}' has {norm.running_mean.numel()} features, the conv {layer.out_channels} outputs"
    return bn, ""


def _frozen(conv: nn.Module, bn: str, norm: nn.Module, flows: list[ModeFlow]) -> str:
    """Why a conv→BN pair gets no SpRe branch because something in it does not train ('' if all does).

    The branch adds a trainable weight and its own BatchNorm: on a conv whose weight is frozen it
    would add a fixed random term to the frozen features, and it needs a BatchNorm that trains.
    """
    tail = "SpRe's branch needs a BatchNorm that trains; plain N:M, folded at convert"
    if not conv.weight.requires_grad:  # pruned at all only with prune_frozen=True
        return (f"weight does not train (frozen, requires_grad=False) and prune_frozen=True: plain N:M, "
                f"'{bn}' folded at convert")
    if norm_spec(norm).frozen:
        return f"BatchNorm '{bn}' is frozen ({type(norm).__qualname__}): {tail}"
    if any(bn in f.idle_norms for f in flows):
        return (f"BatchNorm '{bn}' stays in eval mode while the model trains (mmdet: norm_eval=True): "
                f"{tail} (norm_eval=False gets one)")
    if any(not p.requires_grad for p in (norm.weight, norm.bias) if p is not None):
        return f"BatchNorm '{bn}' is frozen (its affine parameters have requires_grad=False): {tail}"
    return ""


def _nm_blocker(name: str, m: nn.Module, config: SpReConfig, stem: str | None, shared: set[str]) -> str:
    """Why `m` cannot be N:M ('' when it can)."""
    if not isinstance(m, (*_CONVS, nn.Linear)):
        return f"{class_name(type(m))}: only Conv1d/2d/3d and Linear are made N:M"
    if type(m).forward not in _STOCK_FORWARD:
        return (
            f"{class_name(type(m))} overrides forward, so its effective weight may differ from "
            "`weight` (weight standardisation, dynamic padding): left dense"
        )
    if any(fnmatch.fnmatchcase(name, p) for p in config.skip):
        return "matches a skip pattern"
    if config.include is not None and not any(fnmatch.fnmatchcase(name, p) for p in config.include):
        return "matches no include pattern"
    if isinstance(m.weight, nn.parameter.UninitializedParameter):
        return "lazy module not yet initialised: run one forward before prepare"
    if not m.weight.is_floating_point():
        return f"weight dtype {m.weight.dtype} is not floating point"
    if not m.weight.requires_grad and not config.prune_frozen:
        return ("weight does not train (requires_grad=False): pruning it could not be recovered, left "
                "dense; SpReConfig(prune_frozen=True) prunes it anyway")
    if name in shared:
        return "its weight is shared with another module (tied weights)"
    if name == stem and config.dense_stem:
        return "first conv of the network (stem) kept dense (docs/method.md §5); dense_stem=False changes it"
    c = m.weight.shape[1]
    if c == 0 or m.weight.shape[0] == 0:
        return f"empty weight {tuple(m.weight.shape)}: nothing to make N:M"
    if isinstance(m, _ConvNd) and c == 1 and m.groups > 1:
        return (
            "depthwise conv: one input channel per group, no channel run to group "
            "(grouping across taps is not hardware N:M, docs/method.md §1)"
        )
    if c % config.m:
        per = "in-channels per group" if isinstance(m, _ConvNd) else "in_features"
        return f"{per} ({c}) is not a multiple of M={config.m}"
    return ""


def _hidden_use(name: str, flows: list[ModeFlow]) -> str:
    """Why masking `name`'s forward would not reach every use of its weight ('' when it would)."""
    for flow in flows:
        if flow.attr_reads[name]:
            return (
                "its weight is read directly in the forward (e.g. F.linear(x, self.fc.weight)), "
                "where an N:M mask on the layer's own forward would not reach it: left dense"
            )
        if name in flow.inside and not flow.calls[name]:
            return (
                f"inside '{flow.inside[name]}', which fx does not enter (e.g. nn.MultiheadAttention "
                "reads its out_proj.weight directly): its use of this layer is unknown, left dense"
            )
    return ""


def _tied_weights(model: nn.Module) -> set[str]:
    """Names of the modules holding a parameter that another module object holds too.

    One module object under several names (mmdet's `share_conv`) is not tied: its own forward,
    where the mask lives, computes every use of its weight.
    """
    owners: dict[int, dict[int, list[str]]] = defaultdict(lambda: defaultdict(list))
    for mod_name, mod in model.named_modules(remove_duplicate=False):
        for p in mod.parameters(recurse=False):
            owners[id(p)][id(mod)].append(mod_name)
    return {n for by_module in owners.values() if len(by_module) > 1 for names in by_module.values()
            for n in names}


def _check_patterns(config: SpReConfig, names: list[str]) -> None:
    """An include that matches no layer raises (the model would come back with every layer dense;
    `include=()` asks for that: convert then only folds BatchNorms);
    any other include or skip pattern that matches no layer warns: pattern lists shared across
    models (mmdet configs, one skip list for several backbones) may hold some a model lacks."""
    def unmatched(patterns) -> list[str]:
        return [p for p in patterns if not any(fnmatch.fnmatchcase(n, p) for n in names)]

    hint = (f"patterns match whole qualified names (fnmatch: 'layer1.*' matches the layers inside "
            f"'layer1'); this model's layers are named like {names[:3]}; spre_fx.report(model) lists all")
    if not names:
        return
    if config.include and len(unmatched(config.include)) == len(config.include):  # () asks for no layer
        raise ValueError(f"include={config.include!r} matches no conv or linear layer, so every layer "
                         f"would stay dense: {hint}")
    for kind, patterns in (("include", config.include or ()), ("skip", config.skip)):
        for p in unmatched(patterns):
            warnings.warn(f"{kind} pattern {p!r} matches no conv or linear layer: {hint}", UserWarning,
                          stacklevel=4)


def discover(model: nn.Module, config: SpReConfig, concrete_args: dict[str, Any] | None = None) -> Plan:
    """Decide, for every conv and linear of `model`, its treatment and the reason for it."""
    _check_patterns(config, [n for n, m in model.named_modules() if is_layer(m)])
    failures: list[tuple[str, str]] = []
    flows = trace_flows(model, concrete_args, failures)
    modules = dict(model.named_modules())
    stem = flows[0].first_conv or next((n for n, m in modules.items() if isinstance(m, _ConvNd)), None)
    shared = _tied_weights(model)
    layers = []
    for name, m in modules.items():
        if not is_layer(m):
            continue
        kind = "linear" if isinstance(m, nn.Linear) else "conv"
        shape = tuple(m.weight.shape) if not isinstance(m.weight, nn.parameter.UninitializedParameter) else ()
        blocker = _nm_blocker(name, m, config, stem, shared) or _hidden_use(name, flows)
        bn, no_pair = (None, "") if kind == "linear" or name in shared else _pair(name, flows, modules)
        if kind == "conv" and name in shared:
            no_pair = "its weight is shared with another module"
        if blocker and isinstance(m, _CONVS) and type(m).forward not in _STOCK_FORWARD:
            bn = None  # an unknown forward: folding a BN into its `weight` would be wrong too
        spatial = kind == "conv" and max(m.kernel_size) > 1
        k_by_k = spatial and isinstance(m, nn.Conv2d)
        if blocker:
            treatment, reason = Treatment.DENSE, blocker
        elif kind == "linear":
            treatment, reason = Treatment.NM, "linear layer: plain N:M"
        elif bn is not None and k_by_k and config.spre:
            frozen = _frozen(m, bn, modules[bn], flows)
            treatment = Treatment.NM if frozen else Treatment.SPRE
            reason = f"no SpRe branch: {frozen}" if frozen else f"k×k conv followed by BatchNorm '{bn}'"
        elif bn is not None and k_by_k:
            treatment, reason = Treatment.NM, "spre=False: plain N:M (SR-STE)"
        elif bn is not None and spatial:
            conv = next(c for c in _CONVS if isinstance(m, c)).__name__
            treatment, reason = Treatment.NM, (
                f"{'x'.join(map(str, m.kernel_size))} {conv} followed by BatchNorm '{bn}': plain N:M, "
                "SpRe branches are Conv2d-only (the BatchNorm is folded at convert)"
            )
        elif bn is not None:
            size = 'x'.join(map(str, m.kernel_size))
            treatment, reason = Treatment.NM, f"{size} conv: plain N:M (docs/method.md §3)"
        elif k_by_k and config.spre:
            treatment, reason = Treatment.NM, f"no SpRe branch: {no_pair}"
        else:
            treatment, reason = Treatment.NM, "plain N:M" + (f" ({no_pair})" if no_pair else "")
        layers.append(LayerPlan(name, kind, treatment, reason, bn, shape))
    return Plan(config, tuple(layers), tuple(failures))
