"""DistrAttention from Python through the C ABI (ctypes), on numpy arrays.

A small module, not a package: put this directory on ``sys.path`` (or copy the
file) and point it at the built library::

    cargo build --release -p distr-attention-ffi
    DA_LIBRARY=target/release/libdistr_attention.so python3 -c 'import distr_attention'

Without ``DA_LIBRARY`` the module looks for ``libdistr_attention.so`` under
the repository's ``target/release`` and ``target/debug`` (the newer one).

    import numpy as np, distr_attention as da
    q = np.random.randn(1, 128, 4, 64).astype(np.float32)   # [batch, seq, heads, head_dim]
    out, plan = da.forward(q, k, v, da.Config(group_size=2), return_plan=True)
    exact = da.exact_attention(q, k, v)

Tensors are ``[batch, seq, heads, head_dim]`` arrays of float32, float16 or
bfloat16 (``ml_dtypes``), any strides whose last dimension is contiguous
(views such as slices of a packed QKV array work without copies). Outputs are
float32. Errors raise :class:`DistrAttentionError` with the library's status
and message.

The C entry points of this version run on the CPU (host memory). Tensors are
turned into descriptors by :func:`_describe`, which is where GPU entry points
on torch tensors (``data_ptr()``, ``stride()``, the current stream) will
plug in: a descriptor records the device, and each public function picks the
C entry point for it.
"""

from __future__ import annotations

import ctypes
import enum
import os
import pathlib
import threading
from dataclasses import dataclass
from typing import Optional, Sequence

__all__ = [
    "Config",
    "Context",
    "DistrAttentionError",
    "Status",
    "attention",
    "exact_attention",
    "forward",
    "library",
    "plan",
    "plan_shape",
    "projections",
    "version",
]


class Status(enum.IntEnum):
    """``da_status``: the result of every fallible C function."""

    OK = 0
    NULL_POINTER = 1
    MISALIGNED_POINTER = 2
    INVALID_ARGUMENT = 3
    BAD_CONFIG = 4
    INVALID_SHAPE = 5
    SHAPE_MISMATCH = 6
    SIZE_OVERFLOW = 7
    BUFFER_TOO_SMALL = 8
    OVERLAPPING_BUFFERS = 9
    NON_FINITE = 10
    BAD_PLAN = 11
    UNSUPPORTED = 12
    ALLOCATION_FAILED = 13
    PANIC = 14


class DistrAttentionError(RuntimeError):
    """A C call failed: ``status`` (a :class:`Status` or int) and the library's message."""

    def __init__(self, status: int, message: str):
        try:
            status = Status(status)
        except ValueError:
            pass
        self.status = status
        self.message = message
        super().__init__(f"{getattr(status, 'name', status)}: {message}")


# --- the C structs (distr_attention.h) ------------------------------------

DTYPE_F32, DTYPE_F16, DTYPE_BF16 = 0, 1, 2
FUSION = {"mean": 0, "sample": 1}


class _Config(ctypes.Structure):
    _fields_ = [
        ("struct_size", ctypes.c_size_t),
        ("block_rows", ctypes.c_size_t),
        ("group_sizes", ctypes.POINTER(ctypes.c_uint32)),
        ("num_group_sizes", ctypes.c_size_t),
        ("seed", ctypes.c_uint64),
        ("group_size", ctypes.c_uint32),
        ("num_projections", ctypes.c_uint32),
        ("fusion", ctypes.c_uint32),
        ("causal", ctypes.c_uint32),
        ("scale", ctypes.c_float),
        ("reserved", ctypes.c_uint32),
    ]


class _Tensor(ctypes.Structure):
    _fields_ = [
        ("data", ctypes.c_void_p),
        ("dtype", ctypes.c_uint32),
        ("batch", ctypes.c_size_t),
        ("seq", ctypes.c_size_t),
        ("heads", ctypes.c_size_t),
        ("head_dim", ctypes.c_size_t),
        ("stride_batch", ctypes.c_size_t),
        ("stride_seq", ctypes.c_size_t),
        ("stride_head", ctypes.c_size_t),
    ]


class _PlanShape(ctypes.Structure):
    _fields_ = [
        ("batch", ctypes.c_size_t),
        ("heads", ctypes.c_size_t),
        ("blocks", ctypes.c_size_t),
        ("head_dim", ctypes.c_size_t),
        ("block_rows", ctypes.c_size_t),
        ("num_entries", ctypes.c_size_t),
    ]


# --- loading the library ----------------------------------------------------

_P = ctypes.c_void_p
_SIZE = ctypes.c_size_t
_STATUS = ctypes.c_uint32
_SIGNATURES = {
    "da_version": (ctypes.c_char_p, []),
    "da_version_number": (ctypes.c_uint32, []),
    "da_status_string": (ctypes.c_char_p, [ctypes.c_uint32]),
    "da_last_error_message": (ctypes.c_char_p, []),
    "da_context_new": (_STATUS, [ctypes.POINTER(_P)]),
    "da_context_free": (None, [_P]),
    "da_config_default": (_STATUS, [ctypes.POINTER(_Config), _SIZE]),
    "da_get_plan_shape": (_STATUS, [ctypes.POINTER(_Config), ctypes.POINTER(_Tensor), ctypes.POINTER(_PlanShape)]),
    "da_projections_len": (_STATUS, [ctypes.POINTER(_Config), ctypes.POINTER(_SIZE)]),
    "da_projections": (_STATUS, [ctypes.POINTER(_Config), _P, _SIZE]),
    "da_plan": (_STATUS, [_P, ctypes.POINTER(_Config), ctypes.POINTER(_Tensor), _P, _SIZE]),
    "da_attention": (
        _STATUS,
        [_P, ctypes.POINTER(_Config), _P, _SIZE] + [ctypes.POINTER(_Tensor)] * 4 + [_P, _SIZE],
    ),
    "da_exact_attention": (_STATUS, [_P, ctypes.POINTER(_Config)] + [ctypes.POINTER(_Tensor)] * 4 + [_P, _SIZE]),
    "da_forward": (
        _STATUS,
        [_P, ctypes.POINTER(_Config)] + [ctypes.POINTER(_Tensor)] * 4 + [_P, _SIZE, _P, _SIZE],
    ),
}

_lib = None
_lib_lock = threading.Lock()


def _library_path() -> pathlib.Path:
    env = os.environ.get("DA_LIBRARY")
    if env:
        return pathlib.Path(env)
    root = pathlib.Path(__file__).resolve().parent.parent
    candidates = [root / "target" / p / "libdistr_attention.so" for p in ("release", "debug")]
    found = [c for c in candidates if c.is_file()]
    if not found:
        raise OSError(
            "libdistr_attention.so not found: build it with `cargo build --release -p distr-attention-ffi` "
            "or set DA_LIBRARY to its path"
        )
    return max(found, key=lambda c: c.stat().st_mtime)


def library() -> ctypes.CDLL:
    """The loaded C library (loaded on first use), with typed signatures."""
    global _lib
    with _lib_lock:
        if _lib is None:
            lib = ctypes.CDLL(str(_library_path()))
            for name, (restype, argtypes) in _SIGNATURES.items():
                fn = getattr(lib, name)
                fn.restype = restype
                fn.argtypes = argtypes
            _lib = lib
        return _lib


def version() -> str:
    return library().da_version().decode()


def _check(status: int) -> None:
    if status != Status.OK:
        lib = library()
        raise DistrAttentionError(status, lib.da_last_error_message().decode(errors="replace"))


# --- config and context -----------------------------------------------------


@dataclass
class Config:
    """The parameters of DistrAttention (``da_config``); the defaults are the library's."""

    block_rows: int = 64
    group_size: int = 2
    #: One group size per query head, or None for ``group_size`` everywhere.
    group_sizes: Optional[Sequence[int]] = None
    num_projections: int = 16
    seed: int = 0
    fusion: str = "mean"
    causal: bool = False
    #: None for the default 1/sqrt(head_dim).
    scale: Optional[float] = None

    def _c(self):
        """The C struct and the objects it points into (kept alive by the caller)."""
        c = _Config()
        _check(library().da_config_default(ctypes.byref(c), ctypes.sizeof(c)))
        c.block_rows = self.block_rows
        c.group_size = self.group_size
        c.num_projections = self.num_projections
        c.seed = self.seed
        if self.fusion not in FUSION:
            raise ValueError(f"fusion must be one of {sorted(FUSION)}, got {self.fusion!r}")
        c.fusion = FUSION[self.fusion]
        c.causal = 1 if self.causal else 0
        c.scale = 0.0 if self.scale is None else float(self.scale)
        keep = None
        if self.group_sizes is not None:
            keep = (ctypes.c_uint32 * len(self.group_sizes))(*self.group_sizes)
            c.group_sizes = ctypes.cast(keep, ctypes.POINTER(ctypes.c_uint32))
            c.num_group_sizes = len(self.group_sizes)
        return c, keep


class Context:
    """A ``da_context``: scratch memory reused across calls. One per thread;
    the functions below use a per-thread default when none is given."""

    def __init__(self):
        self._ptr = _P()
        _check(library().da_context_new(ctypes.byref(self._ptr)))

    def close(self) -> None:
        if self._ptr:
            library().da_context_free(self._ptr)
            self._ptr = _P()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass


_default = threading.local()


def _context(ctx: Optional[Context]) -> _P:
    if ctx is None:
        if getattr(_default, "ctx", None) is None:
            _default.ctx = Context()
        ctx = _default.ctx
    return ctx._ptr


# --- tensors -----------------------------------------------------------------


def _np():
    try:
        import numpy
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError("distr_attention needs numpy for tensors: pip install numpy") from e
    return numpy


def _dtype_code(np, dtype) -> int:
    if dtype == np.float32:
        return DTYPE_F32
    if dtype == np.float16:
        return DTYPE_F16
    if dtype.name == "bfloat16":  # ml_dtypes.bfloat16
        return DTYPE_BF16
    raise TypeError(f"unsupported dtype {dtype}: use float32, float16 or bfloat16")


def _describe(x, name: str, writable: bool = False) -> _Tensor:
    """The C descriptor of a ``[batch, seq, heads, head_dim]`` array.

    The array must stay alive until the call returns. This is the place for
    other tensor types: a torch tensor on a GPU would be described from
    ``data_ptr()`` and ``stride()`` and routed to the CUDA entry points.
    """
    np = _np()
    if not isinstance(x, np.ndarray):
        raise TypeError(f"{name}: expected a numpy array, got {type(x).__name__}")
    if x.ndim != 4:
        raise ValueError(f"{name}: expected 4 dimensions [batch, seq, heads, head_dim], got shape {x.shape}")
    if writable and not x.flags.writeable:
        raise ValueError(f"{name}: array is read-only")
    item = x.itemsize
    strides = []
    for axis, (stride, size) in enumerate(zip(x.strides, x.shape)):
        if size == 1:
            stride = 0 if axis < 3 else item  # any stride is valid for a single element
        if stride < 0 or stride % item:
            raise ValueError(f"{name}: stride {stride} bytes of axis {axis} is negative or not a multiple of {item}")
        strides.append(stride // item)
    if strides[3] != 1:
        raise ValueError(f"{name}: the last dimension must be contiguous (stride {x.strides[3]} bytes)")
    t = _Tensor()
    t.data = x.__array_interface__["data"][0]
    t.dtype = _dtype_code(np, x.dtype)
    t.batch, t.seq, t.heads, t.head_dim = x.shape
    t.stride_batch, t.stride_seq, t.stride_head = strides[:3]
    return t


def _shape_tensor(q) -> _Tensor:
    """A descriptor of Q's shape only (a shape tuple or an array)."""
    if isinstance(q, (tuple, list)):
        if len(q) != 4:
            raise ValueError(f"expected a shape (batch, seq, heads, head_dim), got {q}")
        t = _Tensor()
        t.dtype = DTYPE_F32
        t.batch, t.seq, t.heads, t.head_dim = q
        t.stride_head = q[3]
        t.stride_seq = q[2] * q[3]
        t.stride_batch = q[1] * q[2] * q[3]
        return t
    return _describe(q, "q")


def _output(np, out, shape, name="out"):
    if out is None:
        return np.empty(shape, dtype=np.float32)
    if out.dtype != np.float32 or tuple(out.shape) != tuple(shape):
        raise ValueError(f"{name}: expected a float32 array of shape {tuple(shape)}, got {out.dtype} {out.shape}")
    return out


# --- the API -----------------------------------------------------------------


def plan_shape(q, config: Optional[Config] = None) -> dict:
    """The plan's dimensions for queries ``q`` (an array or a shape tuple):
    batch, heads, blocks, head_dim, block_rows, num_entries."""
    c, keep = (config or Config())._c()
    t = _shape_tensor(q)
    s = _PlanShape()
    _check(library().da_get_plan_shape(ctypes.byref(c), ctypes.byref(t), ctypes.byref(s)))
    del keep
    return {f: getattr(s, f) for f, _ in _PlanShape._fields_}


def projections(config: Optional[Config] = None):
    """The LSH projection matrix R, ``[block_rows, num_projections]`` float32."""
    np = _np()
    c, _keep = (config or Config())._c()
    n = _SIZE()
    _check(library().da_projections_len(ctypes.byref(c), ctypes.byref(n)))
    r = np.empty(n.value, dtype=np.float32)
    _check(library().da_projections(ctypes.byref(c), r.ctypes.data, r.size))
    return r.reshape(c.block_rows, c.num_projections)


def plan(q, config: Optional[Config] = None, context: Optional[Context] = None):
    """The plan of ``q``: uint16 ``[batch, heads, blocks, head_dim]``, one
    permutation of the head-dimension columns per query block."""
    np = _np()
    config = config or Config()
    s = plan_shape(q, config)
    c, _keep = config._c()
    t = _describe(q, "q")
    p = np.empty((s["batch"], s["heads"], s["blocks"], s["head_dim"]), dtype=np.uint16)
    _check(library().da_plan(_context(context), ctypes.byref(c), ctypes.byref(t), p.ctypes.data, p.size))
    return p


def _attention_args(np, q, k, v, out, return_lse):
    tq, tk, tv = _describe(q, "q"), _describe(k, "k"), _describe(v, "v")
    out = _output(np, out, (q.shape[0], q.shape[1], q.shape[2], v.shape[3]))
    to = _describe(out, "out", writable=True)
    lse = np.empty((q.shape[0], q.shape[2], q.shape[1]), dtype=np.float32) if return_lse else None
    lse_ptr, lse_len = (lse.ctypes.data, lse.size) if lse is not None else (None, 0)
    return (tq, tk, tv, to), out, lse, lse_ptr, lse_len


def _refs(tensors):
    return [ctypes.byref(t) for t in tensors]


def attention(q, k, v, plan, config: Optional[Config] = None, out=None, return_lse: bool = False,
              context: Optional[Context] = None):
    """DistrAttention of ``q`` over ``k``, ``v`` with a given plan (from
    :func:`plan` or another backend). Returns the float32 output
    ``[batch, q_len, q_heads, v_dim]`` (written into ``out`` if given), and
    the log-sum-exp ``[batch, q_heads, q_len]`` with ``return_lse``."""
    np = _np()
    c, _keep = (config or Config())._c()
    plan = np.ascontiguousarray(plan, dtype=np.uint16)
    tensors, out, lse, lse_ptr, lse_len = _attention_args(np, q, k, v, out, return_lse)
    _check(library().da_attention(_context(context), ctypes.byref(c), plan.ctypes.data, plan.size,
                                  *_refs(tensors), lse_ptr, lse_len))
    return (out, lse) if return_lse else out


def exact_attention(q, k, v, config: Optional[Config] = None, out=None, return_lse: bool = False,
                    context: Optional[Context] = None):
    """Exact attention (every head G = 1); ``causal`` and ``scale`` of the config apply."""
    np = _np()
    c, _keep = (config or Config())._c()
    tensors, out, lse, lse_ptr, lse_len = _attention_args(np, q, k, v, out, return_lse)
    _check(library().da_exact_attention(_context(context), ctypes.byref(c), *_refs(tensors), lse_ptr, lse_len))
    return (out, lse) if return_lse else out


def forward(q, k, v, config: Optional[Config] = None, out=None, return_lse: bool = False,
            return_plan: bool = False, context: Optional[Context] = None):
    """One-shot DistrAttention: plan ``q``, then attend. Returns the output,
    followed by the lse and/or the plan when asked for."""
    np = _np()
    config = config or Config()
    c, _keep = config._c()
    tensors, out, lse, lse_ptr, lse_len = _attention_args(np, q, k, v, out, return_lse)
    p = None
    plan_ptr, plan_len = None, 0
    if return_plan:
        s = plan_shape(q, config)
        p = np.empty((s["batch"], s["heads"], s["blocks"], s["head_dim"]), dtype=np.uint16)
        plan_ptr, plan_len = p.ctypes.data, p.size
    _check(library().da_forward(_context(context), ctypes.byref(c), *_refs(tensors), lse_ptr, lse_len,
                                plan_ptr, plan_len))
    result = (out,) + ((lse,) if return_lse else ()) + ((p,) if return_plan else ())
    return result if len(result) > 1 else out
