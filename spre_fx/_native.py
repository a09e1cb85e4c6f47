"""Optional C kernels for the per-step mask updates, built on first use and loaded with ctypes.

`masks.nm_mask` and `masks.spatial_mask` hand float32/float64 CPU weights to them. They compute
exactly what the torch code in masks.py computes (the tests compare the two), in one or two
passes over the weight where the torch code takes a dozen. Without a C compiler, or with
`SPRE_FX_NATIVE=0`, the torch code runs and a warning says so once. `backend()` tells which.
The library is cached per source, flags and compiler (`cc --version`) under `$SPRE_FX_CACHE/native`
(default `~/.cache/spre_fx/native`); a cached file that does not load is rebuilt. `CC` picks the
compiler (default `cc`). Arguments are validated here before any call into C, and again in C.
"""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import math
import os
import platform
import shlex
import subprocess
import tempfile
import threading
import warnings
from pathlib import Path

import torch
from torch import Tensor

_SOURCE = Path(__file__).with_name("_native.c")
# The kernels read float bits through integer pointers: no strict-aliasing assumptions.
_FLAGS = ("-O3", "-fno-strict-aliasing", "-shared", "-fPIC", "-pthread")
_I64 = ctypes.c_int64
_lock = threading.Lock()
_state: dict[str, object] = {}


def _cache_dir() -> Path:
    """`$SPRE_FX_CACHE/native`, the cache scripts/setup_venv.sh uses too (default ~/.cache/spre_fx)."""
    root = os.environ.get("SPRE_FX_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "spre_fx")
    return Path(root) / "native"


def _compiler_id(cc: list[str]) -> bytes:
    """`cc --version`: part of the cache key, so a changed compiler builds a new library."""
    done = subprocess.run([*cc, "--version"], capture_output=True, timeout=60)
    if done.returncode:
        raise OSError(f"`{' '.join(cc)} --version` failed: {done.stderr.decode(errors='replace')[-300:]}")
    return done.stdout


def _build(cc: list[str], lib: Path, source: Path = _SOURCE) -> None:
    lib.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=lib.parent)
    os.close(fd)
    try:  # build aside, then rename: processes of one job may build at the same time
        cmd = [*cc, *_FLAGS, str(source), "-o", tmp, "-lm"]
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
        if done.returncode:
            raise OSError(f"`{' '.join(cmd)}` failed: {done.stderr.strip()[-500:]}")
        os.replace(tmp, lib)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _compile(source_path: Path = _SOURCE) -> ctypes.CDLL:
    cc = shlex.split(os.environ.get("CC", "cc"))
    source = source_path.read_bytes()
    recipe = " ".join([*cc, *_FLAGS, platform.machine()]).encode()
    tag = hashlib.sha256(source + recipe + _compiler_id(cc)).hexdigest()[:16]
    lib = _cache_dir() / f"spre_fx_native_{tag}.so"
    if not lib.exists():
        _build(cc, lib, source_path)
    try:
        dll = ctypes.CDLL(str(lib))
    except OSError as e:  # a truncated or foreign file in the cache: build it again, once
        warnings.warn(f"spre_fx: cached C mask kernels {lib} did not load ({e}); rebuilding", stacklevel=4)
        lib.unlink(missing_ok=True)
        _build(cc, lib, source_path)
        dll = ctypes.CDLL(str(lib))
    vp, i64p, cint = ctypes.c_void_p, ctypes.POINTER(_I64), ctypes.c_int
    dll.spre_nm_mask.argtypes = [vp, cint, vp, _I64, _I64, _I64, i64p, i64p, cint, cint, cint]
    dll.spre_nm_mask.restype = cint
    dll.spre_spatial_kept.argtypes = [vp, cint, _I64, _I64, _I64, i64p, _I64, cint, vp]
    dll.spre_spatial_kept.restype = cint
    if hasattr(dll, "spre_spatial_kept_hinted"):  # absent from builds of older sources (`build`)
        dll.spre_spatial_kept_hinted.argtypes = [vp, cint, _I64, _I64, _I64, i64p, _I64, cint, vp, vp]
        dll.spre_spatial_kept_hinted.restype = cint
    return dll


def library() -> ctypes.CDLL | None:
    """The loaded kernels, or None (after one warning) when they cannot be built or are off."""
    if "lib" not in _state:
        with _lock:
            if "lib" not in _state:
                if os.environ.get("SPRE_FX_NATIVE", "1") == "0":
                    _state["lib"], _state["why"] = None, "disabled by SPRE_FX_NATIVE=0"
                else:
                    try:
                        _state["lib"], _state["why"] = _compile(), None
                    except (OSError, subprocess.SubprocessError, AttributeError) as e:
                        _state["lib"], _state["why"] = None, f"not built: {e}"
                        warnings.warn(f"spre_fx: C mask kernels {_state['why']}; masks are computed "
                                      "with torch instead (same masks, slower on CPU)", stacklevel=3)
    return _state["lib"]  # type: ignore[return-value]


def build(source: str | os.PathLike) -> ctypes.CDLL:
    """Another version of the kernels' C source, built (and cached) like the shipped one: what
    benchmarks compare the shipped kernels against (`git show REV:spre_fx/_native.c`)."""
    return _compile(Path(source))


@contextlib.contextmanager
def using(lib: ctypes.CDLL | None):
    """Run the block with `lib` (from `build`) as the kernels, or the torch code for None."""
    library()
    saved = _state["lib"], _state["why"]
    _state["lib"], _state["why"] = lib, None if lib is not None else "switched off by using(None)"
    try:
        yield
    finally:
        _state["lib"], _state["why"] = saved


def backend() -> str:
    """'native' when the C kernels run, else 'torch (<why>)'."""
    return "native" if library() is not None else f"torch ({_state['why']})"


def _layout(t: Tensor) -> tuple[int, int, int, tuple[int, int, int]] | None:
    """(O, C, taps, element strides of o, c and tap) of `[O, C, *kernel]`, when the kernel axes
    collapse into one strided axis (contiguous and channels_last do); else None."""
    kernel = [(size, stride) for size, stride in zip(t.shape[2:], t.stride()[2:]) if size != 1]
    for (_, outer), (size, inner) in zip(kernel, kernel[1:]):
        if outer != inner * size:
            return None
    tap_stride = kernel[-1][1] if kernel else 1
    return t.shape[0], t.shape[1], math.prod(t.shape[2:]), (t.stride(0), t.stride(1), tap_stride)


def _plain_cpu(t: Tensor) -> bool:
    """A real CPU tensor with memory behind it (not fake, meta, DTensor or another subclass)."""
    return type(t) in (Tensor, torch.nn.Parameter) and t.device.type == "cpu"


def _ready(weight: Tensor) -> ctypes.CDLL | None:
    if not _plain_cpu(weight) or weight.dtype not in (torch.float32, torch.float64):
        return None
    if torch.compiler.is_compiling():  # no data pointers while tracing: the torch code compiles
        return None
    return library()


def _extent(t: Tensor) -> tuple[int, int]:
    """[first, last) byte addresses `t` reads or writes."""
    if t.numel() == 0:
        return t.data_ptr(), t.data_ptr()
    last = sum((size - 1) * stride for size, stride in zip(t.shape, t.stride()))
    return t.data_ptr(), t.data_ptr() + (last + 1) * t.element_size()


def _disjoint(a: Tensor, b: Tensor) -> bool:
    (a0, a1), (b0, b1) = _extent(a), _extent(b)
    return a1 <= b0 or b1 <= a0


def _conv_weight(weight: Tensor) -> bool:
    """[O, C, *kernel] with C > 0 and non-negative strides: what both kernels index."""
    return weight.dim() >= 2 and weight.shape[1] > 0 and all(s >= 0 for s in weight.stride())


def nm_mask(weight: Tensor, n: int, m: int, out: Tensor) -> bool:
    """Write the N:M mask of `weight` into the bool tensor `out`; False when not handled here.

    Everything the C code indexes is checked first (it trusts its arguments as far as it can).
    """
    lib = _ready(weight)
    if lib is None or not 2 <= m <= 8 or not 1 <= n < m or not _conv_weight(weight):
        return False
    if weight.shape[1] % m or not _plain_cpu(out) or out.dtype != torch.bool or out.shape != weight.shape:
        return False
    if torch._debug_has_internal_overlap(out) != 0 or not _disjoint(weight, out):
        return False  # a mask element written twice, or a write into the weight being read
    wl, ol = _layout(weight), _layout(out)
    if wl is None or ol is None:
        return False
    o, c, taps, wstrides = wl
    rc = lib.spre_nm_mask(weight.data_ptr(), int(weight.dtype == torch.float64), out.data_ptr(),
                          o, c, taps, (_I64 * 3)(*wstrides), (_I64 * 3)(*ol[3]), n, m,
                          torch.get_num_threads())
    if rc:
        return False
    if not out.is_inference():  # written behind autograd's back: caches keyed on it must see it
        torch.autograd.graph.increment_version(out)
    return True


def spatial_hint() -> Tensor:
    """A new hint for `spatial_kept`: one per layer, passed at each update of that layer."""
    return torch.tensor([-1, 0, 0], dtype=torch.int64)


def spatial_kept(weight: Tensor, k: int, hint: Tensor | None = None) -> Tensor | None:
    """Per kernel tap, how many |w| exceed the k-th smallest |w| of the layer (1 <= k <= numel):
    the per-tap kept counts of `masks.magnitude_mask`. None when not handled here.

    `hint` (from `spatial_hint`, kept by the caller per layer) remembers where the k-th |w| was
    last time and how far it may move: while it stays within that (a weight moved by one
    optimizer step), one pass over the weight instead of two. It changes only the speed: the
    counts are the same for any hint.
    """
    lib = _ready(weight)
    if lib is None or not _conv_weight(weight) or weight.dim() < 3 or not 1 <= k <= weight.numel():
        return None
    layout = _layout(weight)
    if layout is None:
        return None
    o, c, taps, strides = layout
    kept = torch.empty(taps, dtype=torch.int64)
    args = (weight.data_ptr(), int(weight.dtype == torch.float64), o, c, taps, (_I64 * 3)(*strides), k,
            torch.get_num_threads(), kept.data_ptr())
    if hint is not None and (hint.dtype != torch.int64 or hint.shape != (3,) or not _plain_cpu(hint)
                             or not hint.is_contiguous()):
        raise ValueError("hint must come from spatial_hint(): a contiguous CPU int64 tensor of 3")
    if hint is None or not hasattr(lib, "spre_spatial_kept_hinted"):
        rc = lib.spre_spatial_kept(*args)
    else:
        rc = lib.spre_spatial_kept_hinted(*args, hint.data_ptr())
    return kept.reshape(weight.shape[2:]) if rc == 0 else None
