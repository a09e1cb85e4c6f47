"""conv -> norm pairs seen at run time, without fx: the zoos' independent count of what SpRe and
the BatchNorm fold can apply to.

Forward hooks record each conv's output and each norm's input; a pair is a conv called once whose
output tensor is, unmodified (same autograd node), the input of a norm called once, and used by
nothing else (the autograd graph, rooted at the model's outputs and at every module's output, has
one consumer of the conv's node). A conv must pair with the same norm in every mode it runs in.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from spre_fx.compare import flat_tensors as tensors  # every tensor of a nested output


def _consumers(roots: list[torch.Tensor]) -> Counter:
    """How many times each autograd node is used as an input by another node of the graph."""
    uses: Counter = Counter()
    stack = list({t.grad_fn for t in roots if t.grad_fn is not None})
    seen = set(stack)
    while stack:
        node = stack.pop()
        for nxt, _ in node.next_functions:
            if nxt is None:
                continue
            uses[nxt] += 1
            if nxt not in seen:
                seen.add(nxt)
                stack.append(nxt)
    return uses


def _pairs_in_mode(model: nn.Module, forward: Callable[[nn.Module], Any], training: bool,
                   convs: tuple[type, ...], is_norm: Callable[[nn.Module], bool]) -> dict[str, str | None]:
    """Every conv called in this mode -> the norm it exclusively feeds (None if none)."""
    conv_node: dict[str, Any] = {}
    norm_input: dict[str, Any] = {}
    calls: Counter = Counter()
    roots: list[torch.Tensor] = []

    def on_conv(name):
        def hook(_m, _inp, out):
            calls[name] += 1
            conv_node[name] = out.grad_fn if isinstance(out, torch.Tensor) else None
        return hook

    def on_norm(name):
        def hook(_m, inp):
            calls[name] += 1
            norm_input[name] = inp[0].grad_fn if inp and isinstance(inp[0], torch.Tensor) else None
        return hook

    def on_any(_m, _inp, out):
        roots.extend(tensors(out))  # a use inside a later detached branch still counts

    handles = []
    for name, m in model.named_modules():
        if isinstance(m, convs):
            handles.append(m.register_forward_hook(on_conv(name)))
        elif is_norm(m):
            handles.append(m.register_forward_pre_hook(on_norm(name)))
        if not isinstance(m, convs):
            handles.append(m.register_forward_hook(on_any))
    model.train(training)  # may freeze parameters (mmdet's frozen_stages): their flags are kept
    frozen = [q for q in model.parameters() if not q.requires_grad]
    try:
        for q in frozen:  # so that frozen convs' outputs, too, are nodes of the autograd graph
            q.requires_grad_(True)
        with torch.enable_grad():
            out = forward(model)
    finally:
        for h in handles:
            h.remove()
        for q in frozen:
            q.requires_grad_(False)
    uses = _consumers([*tensors(out), *roots])
    node_to_norm = {id(node): n for n, node in norm_input.items() if node is not None and calls[n] == 1}
    pairs: dict[str, str | None] = {}
    for conv, node in conv_node.items():
        norm = node_to_norm.get(id(node)) if node is not None and calls[conv] == 1 else None
        pairs[conv] = norm if norm is not None and uses[node] == 1 else None
    return pairs


def runtime_conv_norm_pairs(
    model: nn.Module,
    forward: Callable[[nn.Module], Any],
    *,
    convs: tuple[type, ...] = (nn.Conv2d,),
    is_norm: Callable[[nn.Module], bool] = lambda m: isinstance(m, _BatchNorm),
    modes: tuple[bool, ...] = (True, False),
) -> dict[str, str]:
    """conv -> norm pairs seen at run time by `forward(model)` in each of `modes` (training, eval).

    Runs forwards in training mode too: call it on a model whose state no longer matters.
    """
    seen = [_pairs_in_mode(model, forward, training, convs, is_norm) for training in modes]
    result = {}
    for conv in set().union(*seen):
        norms = {mode[conv] for mode in seen if conv in mode}
        if len(norms) == 1 and None not in norms:
            result[conv] = norms.pop()
    return result
