"""ONNX export with the checks that matter for TensorRT's sparse-weight detection.

`export_onnx` runs `torch.onnx.export`, then finds every N:M layer's weight among the graph's
Conv/Gemm/MatMul initialisers, checks it is still N:M in the layout TensorRT reads, and compares
onnxruntime's outputs with PyTorch's. docs/deploy.md has the TensorRT story.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from ..compare import flat_tensors, relative_error
from ..masks import is_nm
from ..module_tree import model_copy, modes_restored
from ..plan import Treatment, plan_of
from .backend import has_sparse_kernels
from .im2col import dense_weight

__all__ = ["OnnxWeight", "OnnxExport", "onnx_weights", "export_onnx"]


@dataclass(frozen=True)
class OnnxWeight:
    """Where an N:M layer's weight went in the ONNX graph, and whether it is still N:M there.

    tensor/op are None when the layer is not in the exported graph (e.g. a training-only head).
    matched_by: "name", "value" (equal, up to the transpose of a MatMul) or "zeros" (same zero
    pattern, e.g. after the exporter fused a BatchNorm scale into it).
    """

    layer: str
    tensor: str | None
    op: str | None
    shape: tuple[int, ...] | None
    matched_by: str | None
    nm: bool | None


@dataclass(frozen=True)
class OnnxExport:
    path: str
    nm: tuple[int, int]
    weights: tuple[OnnxWeight, ...]
    output_error: float | None  # max |torch - onnxruntime| / max |torch|, None when not checked

    @property
    def trtexec(self) -> str:
        """The TensorRT build command that uses the 2:4 weights (needs an NVIDIA GPU)."""
        return f"trtexec --onnx={self.path} --sparsity=enable --fp16"


def _require_onnx(dynamo: bool = False) -> None:
    """Raise an ImportError naming the extra when a package the ONNX path needs is missing."""
    import importlib.util

    needed = ("onnx", "onnxscript") if dynamo else ("onnx",)
    missing = [name for name in needed if importlib.util.find_spec(name) is None]
    if missing:
        raise ImportError(
            f"spre_fx's ONNX export needs {' and '.join(missing)} (not installed; onnxscript runs "
            'the default dynamo exporter): pip install "spre_fx[onnx]"'
        )


def _onnx_gemm_weights(model) -> list[tuple[str, str, Any]]:
    """(tensor name, op, weight as [O, K...]) for every Conv/Gemm/MatMul with a constant weight."""
    from onnx import helper, numpy_helper

    consts = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    for node in model.graph.node:
        if node.op_type == "Constant":
            for a in node.attribute:
                if a.name == "value":
                    consts[node.output[0]] = numpy_helper.to_array(a.t)
    out = []
    for node in model.graph.node:
        if node.op_type not in ("Conv", "Gemm", "MatMul") or len(node.input) < 2:
            continue
        name = node.input[1]
        w = consts.get(name)
        if w is None:
            continue
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        if node.op_type == "Gemm" and not attrs.get("transB", 0):
            w = w.T
        elif node.op_type == "MatMul":
            if w.ndim != 2:
                continue
            w = w.T
        out.append((name, node.op_type, w))
    return out


def onnx_weights(onnx_model, converted: nn.Module) -> tuple[OnnxWeight, ...]:
    """Find every N:M layer of `converted` among the Conv/Gemm/MatMul weights of an ONNX model
    (a ModelProto or a path) and check its N:M pattern in the layout TensorRT reads."""
    _require_onnx()
    import numpy as np
    import onnx

    if isinstance(onnx_model, (str, os.PathLike)):
        onnx_model = onnx.load(os.fspath(onnx_model))
    plan = plan_of(converted, stage="converted")
    n, m = plan.config.nm
    modules = dict(converted.named_modules())
    candidates = _onnx_gemm_weights(onnx_model)
    used: set[int] = set()
    found = []
    for lp in plan.layers:
        if lp.treatment == Treatment.DENSE:
            continue
        ref = dense_weight(modules[lp.name]).detach().cpu().numpy()
        match = _match(candidates, used, f"{lp.name}.weight", ref)
        if match is None:
            found.append(OnnxWeight(lp.name, None, None, None, None, None))
            continue
        i, how = match
        used.add(i)
        name, op, w = candidates[i]
        ok = is_nm(torch.tensor(np.ascontiguousarray(w)), n, m)
        found.append(OnnxWeight(lp.name, name, op, tuple(w.shape), how, ok))
    return tuple(found)


def _match(candidates: list, used: set[int], name: str, ref) -> tuple[int, str] | None:
    """Index of the ONNX weight that is `ref`: by name, else by value, else by zero pattern."""
    import numpy as np

    tests = (
        ("name", lambda t, w: t == name),
        ("value", lambda t, w: np.array_equal(w, ref)),
        ("zeros", lambda t, w: np.array_equal(w != 0, ref != 0)),
    )
    for how, test in tests:
        for i, (tname, _, w) in enumerate(candidates):
            if i not in used and w.shape == ref.shape and test(tname, w):
                return i, how
    return None


def _check_exportable_dtypes(converted: nn.Module, example_inputs: Any) -> None:
    """Raise ValueError, before anything is exported, when the model or its inputs are bfloat16."""
    tensors = [*converted.parameters(), *converted.buffers(), *flat_tensors(example_inputs)]
    if any(t.dtype == torch.bfloat16 for t in tensors):
        raise ValueError(
            "export_onnx needs a float32 or float16 model and inputs, found bfloat16 (numpy, which reads "
            "the exported weights, and onnxruntime's CPU kernels, which check the outputs, have no "
            "bfloat16): export a copy, e.g. export_onnx(copy.deepcopy(converted).half(), x.half(), path); "
            "trtexec --fp16 builds the same engine from it"
        )


def _float16_rounding(converted: nn.Module, args: tuple, out: Any) -> tuple[float, Any]:
    """(PyTorch's own error, the exact output) for the ONNX check: a float16 model is measured
    against its float32 copy, as `verify` measures reduced precision (0.0 and `out` otherwise)."""
    if not any(p.dtype == torch.float16 for p in converted.parameters()):
        return 0.0, out
    exact_model = model_copy(converted).float()
    exact_model.eval()
    with torch.no_grad():
        exact = exact_model(*(a.float() if isinstance(a, Tensor) and a.is_floating_point() else a
                              for a in args))
    return relative_error(exact, out), exact


def export_onnx(
    converted: nn.Module,
    example_inputs: Tensor | tuple,
    path: str | os.PathLike,
    *,
    dynamo: bool = True,
    check_outputs: bool = True,
    rtol: float = 1e-4,
    **export_kwargs: Any,
) -> OnnxExport:
    """`torch.onnx.export` a converted (dense) model, then check what TensorRT needs.

    Exports in eval mode (modes restored) with `dynamo` (True: the torch.export-based exporter,
    needs onnxscript; False: the TorchScript one) and `export_kwargs` passed through. Then:
    every N:M layer's Conv/Gemm/MatMul weight is found in the graph and must still be N:M in the
    layout TensorRT reads (ValueError otherwise); with `check_outputs` and onnxruntime installed,
    the ONNX outputs must equal PyTorch's (max error relative to the largest output <= rtol; for
    a float16 model both are measured against its float32 copy, and onnxruntime may be twice as far
    from it as PyTorch is, plus rtol).
    `result.trtexec` is the TensorRT build command. float32 and float16 models export; a bfloat16
    one is refused before exporting (numpy, which reads the graph's weights, and onnxruntime's CPU
    kernels, which check its outputs, have no bfloat16): export a float16 or float32 copy.
    """
    plan = plan_of(converted, stage="converted")
    _require_onnx(dynamo)
    _check_exportable_dtypes(converted, example_inputs)
    if has_sparse_kernels(converted):
        raise ValueError(
            "this model runs on semi-structured kernels, which ONNX cannot hold: export the dense "
            "conversion (spre_fx.convert(prepared), backend='dense'); TensorRT packs 2:4 weights itself "
            "(--sparsity=enable)"
        )
    args = example_inputs if isinstance(example_inputs, tuple) else (example_inputs,)
    path = os.fspath(path)
    with modes_restored(converted):
        converted.eval()
        torch.onnx.export(converted, args, path, dynamo=dynamo, **export_kwargs)
        with torch.no_grad():
            ref = converted(*args)
    weights = onnx_weights(path, converted)
    broken = [w.layer for w in weights if w.nm is False]
    if broken:
        n, m = plan.config.nm
        raise ValueError(f"exported weights of {broken} are no longer {n}:{m}: TensorRT would run them dense")
    error = None
    if check_outputs:
        try:
            import onnxruntime as ort
        except ImportError:
            ort = None
        if ort is not None:
            session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
            feeds = [t for t in args if isinstance(t, Tensor)]
            inputs = {i.name: t.detach().cpu().numpy() for i, t in zip(session.get_inputs(), feeds)}
            got = [torch.from_numpy(g) for g in session.run(None, inputs)]
            own, exact = _float16_rounding(converted, args, ref)
            error = relative_error(exact, got)
            if error > 2 * own + rtol:
                bound = (f"{2 * own + rtol:.3g} (2 × PyTorch's {own:.3g} + {rtol:g})" if own
                         else f"{rtol:g}")
                raise ValueError(
                    f"onnxruntime output differs from PyTorch: relative error {error:.3g} > {bound}")
    return OnnxExport(path, plan.config.nm, weights, error)
