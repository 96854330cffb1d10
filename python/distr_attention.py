"""DistrAttention from Python through the C ABI (ctypes), on numpy arrays and
(optionally) PyTorch tensors.

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

Beyond the forward pass: grouping modes (``Config(grouping="similarity")``,
``"key_weighted"``), :func:`attention_backward` and
:func:`exact_attention_backward` (gradients), :func:`estimate_errors`
(per-head error estimates), :func:`choose_group_sizes` (the error-budget
planner) and :func:`load_group_sizes` / :func:`config_from_table` (the JSON
table of ``examples/plan_heads.rs``).

PyTorch (imported only when used, never required): :class:`DistrAttentionFunction`
is a ``torch.autograd.Function`` over CPU and CUDA tensors, :func:`distr_attention` applies
it, and :func:`hf_attention` is an attention function for Hugging Face
``transformers`` models, registered as ``attn_implementation="distr_attention"``
by :func:`register_transformers` (automatically at import when ``transformers``
is already imported)::

    import distr_attention as da
    da.register_transformers(da.Config(group_size=2))
    model = AutoModelForCausalLM.from_pretrained(name, attn_implementation="distr_attention")

CUDA: :func:`plan`, :func:`attention`, :func:`exact_attention` and
:func:`forward` also take torch CUDA tensors (f16 or bf16, ``[batch, seq,
heads, head_dim]`` with any element strides whose last dimension is
contiguous), when the library was built with the CUDA entry points
(``cargo build --release -p distr-attention-ffi --features cuda``;
:func:`cuda_built` tells). They pass ``data_ptr()``, the strides and
``torch.cuda.current_stream().cuda_stream`` to the ``da_cuda_*`` functions,
which queue the kernels on that stream and return; results are torch tensors
on the same device, the output in ``q``'s dtype unless ``out_dtype`` (or
``out``) says float32. A :class:`CudaContext` per thread and device is made
on first use. :func:`attention_backward` and :func:`exact_attention_backward`
take CUDA tensors too (``da_cuda_attention_backward``, with a workspace from
PyTorch's allocator), and so :class:`DistrAttentionFunction` and
:func:`hf_attention` train on the GPU: the forward keeps the plan, the
float32 output and the log-sum-exp, the backward runs on the current stream.
"""

from __future__ import annotations

import ctypes
import dataclasses
import enum
import os
import pathlib
import sys
import threading
from dataclasses import dataclass
from typing import Callable, Optional, Sequence, Union

__all__ = [
    "BudgetPlan",
    "Config",
    "Context",
    "CudaContext",
    "DistrAttentionError",
    "DistrAttentionFunction",
    "Status",
    "attention",
    "attention_backward",
    "choose_group_sizes",
    "config_from_table",
    "cuda_built",
    "distr_attention",
    "estimate_errors",
    "exact_attention",
    "exact_attention_backward",
    "forward",
    "hf_attention",
    "library",
    "load_group_sizes",
    "plan",
    "plan_shape",
    "projections",
    "register_transformers",
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
    IO_ERROR = 15
    BAD_TABLE = 16
    NOT_FOUND = 17
    CUDA_ERROR = 18
    CUDA_UNAVAILABLE = 19


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
GROUPING = {"lsh": 0, "similarity": 1, "key_weighted": 2, "key-weighted": 2}
_GROUPING_NAMES = {0: "lsh", 1: "similarity", 2: "key_weighted"}
BUDGET_TARGET_MAX_ERROR, BUDGET_TARGET_FLOP_SAVING = 0, 1


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
        ("grouping", ctypes.c_uint32),
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
    "da_plan_with_keys": (
        _STATUS,
        [_P, ctypes.POINTER(_Config), ctypes.POINTER(_Tensor), ctypes.POINTER(_Tensor), _P, _SIZE],
    ),
    "da_attention_backward": (
        _STATUS,
        [_P, ctypes.POINTER(_Config), _P, _SIZE] + [ctypes.POINTER(_Tensor)] * 4 + [_P, _SIZE]
        + [ctypes.POINTER(_Tensor)] * 4,
    ),
    "da_exact_attention_backward": (
        _STATUS,
        [_P, ctypes.POINTER(_Config)] + [ctypes.POINTER(_Tensor)] * 4 + [_P, _SIZE] + [ctypes.POINTER(_Tensor)] * 4,
    ),
    "da_estimate_errors": (
        _STATUS,
        [_P, ctypes.POINTER(_Config), _P, _SIZE] + [ctypes.POINTER(_Tensor)] * 3 + [_SIZE, _P, _P, _P, _SIZE],
    ),
    "da_choose_group_sizes": (
        _STATUS,
        [ctypes.POINTER(_Config), _P, _P, _P, _SIZE, _P, _SIZE, ctypes.c_uint32, ctypes.c_double,
         _P, _P, _P, _SIZE, _P, _P],
    ),
    "da_load_group_sizes": (
        _STATUS,
        [ctypes.c_char_p, _SIZE, ctypes.c_char_p, ctypes.c_char_p, _P, _SIZE, ctypes.POINTER(_SIZE),
         ctypes.POINTER(_Config)],
    ),
    "da_load_group_sizes_file": (
        _STATUS,
        [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, _P, _SIZE, ctypes.POINTER(_SIZE), ctypes.POINTER(_Config)],
    ),
    "da_cuda_built": (ctypes.c_uint32, []),
    "da_cuda_context_create": (_STATUS, [ctypes.POINTER(_P)]),
    "da_cuda_context_destroy": (None, [_P]),
    "da_cuda_plan": (_STATUS, [_P, ctypes.POINTER(_Config), ctypes.POINTER(_Tensor), _P, _SIZE, _P]),
    "da_cuda_attention": (
        _STATUS,
        [_P, ctypes.POINTER(_Config), _P, _SIZE] + [ctypes.POINTER(_Tensor)] * 4 + [_P, _SIZE, _P],
    ),
    "da_cuda_exact_attention": (
        _STATUS,
        [_P, ctypes.POINTER(_Config)] + [ctypes.POINTER(_Tensor)] * 4 + [_P, _SIZE, _P],
    ),
    "da_cuda_forward": (
        _STATUS,
        [_P, ctypes.POINTER(_Config)] + [ctypes.POINTER(_Tensor)] * 4 + [_P, _SIZE, _P, _SIZE, _P],
    ),
    "da_cuda_backward_workspace_size": (
        _STATUS,
        [ctypes.POINTER(_Config), ctypes.POINTER(_Tensor), ctypes.POINTER(_Tensor), ctypes.POINTER(_SIZE)],
    ),
    "da_cuda_attention_backward": (
        _STATUS,
        [_P, ctypes.POINTER(_Config), _P, _SIZE] + [ctypes.POINTER(_Tensor)] * 4 + [_P, _SIZE]
        + [ctypes.POINTER(_Tensor)] * 4 + [_P, _SIZE, _P],
    ),
    "da_cuda_exact_attention_backward": (
        _STATUS,
        [_P, ctypes.POINTER(_Config)] + [ctypes.POINTER(_Tensor)] * 4 + [_P, _SIZE]
        + [ctypes.POINTER(_Tensor)] * 4 + [_P, _SIZE, _P],
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


def cuda_built() -> bool:
    """Whether the loaded library has the CUDA entry points (built with the
    cargo feature ``cuda``); without them CUDA tensors raise
    :class:`DistrAttentionError` with ``Status.CUDA_UNAVAILABLE``."""
    return bool(library().da_cuda_built())


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
    #: How plans group columns: "lsh" (the paper's), "similarity" or
    #: "key_weighted" (the similarity modes need powers of two as group sizes).
    grouping: str = "lsh"

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
        if self.grouping not in GROUPING:
            raise ValueError(f"grouping must be one of {sorted(GROUPING)}, got {self.grouping!r}")
        c.grouping = GROUPING[self.grouping]
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


def _is_torch(x) -> bool:
    return type(x).__module__.split(".")[0] == "torch" and hasattr(x, "data_ptr")


def _is_cuda(x) -> bool:
    return _is_torch(x) and x.device.type == "cuda"


def _host_only(x, name: str) -> None:
    """Refuses tensors that are not in host memory where a CPU entry point
    needs them (the CUDA entry points cover plans, attention, the forward and
    the backward pass, not the estimates or the planner): an error, not a
    silent copy."""
    device = getattr(x, "device", None)
    if device is not None and getattr(device, "type", "cpu") != "cpu":
        raise NotImplementedError(
            f"{name}: a tensor on {device}: this function has no CUDA entry point in this library version; "
            "move it to the CPU"
        )


def _describe_torch(x, name: str, device_ok: bool = False) -> _Tensor:
    """The C descriptor of a ``[batch, seq, heads, head_dim]`` torch tensor
    (in host memory, or on a CUDA device with ``device_ok``)."""
    import torch

    if not device_ok:
        _host_only(x, name)
    if x.dim() != 4:
        raise ValueError(f"{name}: expected 4 dimensions [batch, seq, heads, head_dim], got shape {tuple(x.shape)}")
    codes = {torch.float32: DTYPE_F32, torch.float16: DTYPE_F16, torch.bfloat16: DTYPE_BF16}
    if x.dtype not in codes:
        raise TypeError(f"{name}: unsupported dtype {x.dtype}: use float32, float16 or bfloat16")
    strides = [0 if size == 1 and axis < 3 else stride for axis, (stride, size) in enumerate(zip(x.stride(), x.shape))]
    if x.shape[3] > 1 and strides[3] != 1:
        raise ValueError(f"{name}: the last dimension must be contiguous (stride {strides[3]})")
    t = _Tensor()
    t.data = x.data_ptr()
    t.dtype = codes[x.dtype]
    t.batch, t.seq, t.heads, t.head_dim = (int(d) for d in x.shape)
    t.stride_batch, t.stride_seq, t.stride_head = strides[:3]
    return t


def _describe(x, name: str, writable: bool = False) -> _Tensor:
    """The C descriptor of a ``[batch, seq, heads, head_dim]`` array (numpy)
    or tensor (torch, in host memory).

    The array must stay alive until the call returns.
    """
    if _is_torch(x):
        return _describe_torch(x, name)
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


# --- CUDA: torch tensors on a GPU ----------------------------------------------
#
# The da_cuda_* functions take device pointers and a stream; the handle they
# need is bound to the CUDA context current at its creation, which must be
# current at every call. PyTorch uses each device's primary context, which a
# thread that has not touched the device yet may not have current:
# `_activate` makes it current through the driver API (libcuda).

_LIBCUDA = None
_PRIMARY: dict = {}


def _libcuda():
    global _LIBCUDA
    if _LIBCUDA is None:
        _LIBCUDA = ctypes.CDLL("libcuda.so.1")
    return _LIBCUDA


def _cu_check(call: str, result: int) -> None:
    if result != 0:
        raise DistrAttentionError(Status.CUDA_ERROR, f"{call} failed: CUDA driver error {result}")


def _activate(index: int) -> None:
    """Makes the primary context of CUDA device ``index`` (PyTorch's) current on this thread."""
    cu = _libcuda()
    primary = _PRIMARY.get(index)
    if primary is None:
        _torch().cuda.init()
        dev, ctx = ctypes.c_int(), ctypes.c_void_p()
        _cu_check("cuDeviceGet", cu.cuDeviceGet(ctypes.byref(dev), ctypes.c_int(index)))
        # One reference for the life of the process (PyTorch holds the context anyway).
        _cu_check("cuDevicePrimaryCtxRetain", cu.cuDevicePrimaryCtxRetain(ctypes.byref(ctx), dev))
        primary = _PRIMARY[index] = ctx.value
    current = ctypes.c_void_p()
    _cu_check("cuCtxGetCurrent", cu.cuCtxGetCurrent(ctypes.byref(current)))
    if current.value != primary:
        _cu_check("cuCtxSetCurrent", cu.cuCtxSetCurrent(ctypes.c_void_p(primary)))


class CudaContext:
    """A ``da_cuda_context``: the library's CUDA handle for one device (bound to
    its primary context, PyTorch's), which holds the loaded kernels and the LSH
    projections. Use one per thread and device; the functions make one per
    thread and device on first use when none is given. Closing it waits for
    the device's queued work."""

    def __init__(self, device=None):
        torch = _torch()
        device = torch.device("cuda" if device is None else device)
        if device.type != "cuda":
            raise ValueError(f"CudaContext: expected a CUDA device, got {device}")
        if device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        self.device = device
        self._ptr = _P()
        if cuda_built():
            _activate(device.index)
        # Without the CUDA entry points the library says so (Status.CUDA_UNAVAILABLE).
        _check(library().da_cuda_context_create(ctypes.byref(self._ptr)))

    def close(self) -> None:
        if self._ptr:
            library().da_cuda_context_destroy(self._ptr)
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


_cuda_default = threading.local()


def _cuda_context(context, device) -> _P:
    """The handle for ``device`` on this thread (``context`` or the thread's default), made current."""
    if context is None:
        handles = getattr(_cuda_default, "handles", None)
        if handles is None:
            handles = _cuda_default.handles = {}
        context = handles.get(device.index)
        if context is None:
            context = handles[device.index] = CudaContext(device)
    elif not isinstance(context, CudaContext):
        raise TypeError(f"context: CUDA tensors need a CudaContext, got {type(context).__name__}")
    elif context.device != device:
        raise ValueError(f"context: a CudaContext of {context.device}, the tensors are on {device}")
    _activate(device.index)
    return context._ptr


def _stream(torch, device):
    """The current stream of ``device`` as the C ABI's ``void *`` (None: the default stream)."""
    return torch.cuda.current_stream(device).cuda_stream or None


def _cuda_descs(tensors, device):
    descs = []
    for x, name in tensors:
        if not _is_cuda(x) or x.device != device:
            where = getattr(x, "device", "the host")
            raise ValueError(f"{name}: expected a CUDA tensor on {device}, got one on {where}")
        descs.append(_describe_torch(x, name, device_ok=True))
    return descs


def _plan_tensor(torch, q, config, device):
    s = plan_shape(tuple(q.shape), config)
    shape = (s["batch"], s["heads"], s["blocks"], s["head_dim"])
    return torch.empty(shape, dtype=getattr(torch, "uint16", torch.int16), device=device)


def _device_plan(torch, plan, device):
    """A plan as a contiguous 2-byte integer tensor on ``device`` (numpy arrays and other devices' tensors copied)."""
    if _is_torch(plan):
        if plan.element_size() != 2 or plan.is_floating_point():
            raise TypeError(f"plan: expected a uint16 (or int16) tensor, got {plan.dtype}")
        return plan.to(device).contiguous()
    np = _np()
    return torch.from_numpy(np.ascontiguousarray(plan, dtype=np.uint16).view(np.int16)).to(device)


def _cuda_plan(q, config: Config, context):
    torch = _torch()
    device = q.device
    p = _plan_tensor(torch, q, config, device)
    c, _keep = config._c()
    (tq,) = _cuda_descs([(q, "q")], device)
    handle = _cuda_context(context, device)
    _check(library().da_cuda_plan(handle, ctypes.byref(c), ctypes.byref(tq), p.data_ptr(), p.numel(),
                                  _stream(torch, device)))
    return p


def _cuda_attend(kind: str, q, k, v, config: Config, plan=None, out=None, out_dtype=None, return_lse=False,
                 return_plan=False, context=None):
    """``kind``: "attention" (on ``plan``; None when every head has G = 1), "exact" or "forward"."""
    torch = _torch()
    device = q.device
    if out is None:
        out = torch.empty((q.shape[0], q.shape[1], q.shape[2], v.shape[3]), dtype=out_dtype or q.dtype, device=device)
    tensors = _cuda_descs([(q, "q"), (k, "k"), (v, "v"), (out, "out")], device)
    lse = torch.empty((q.shape[0], q.shape[2], q.shape[1]), dtype=torch.float32, device=device) if return_lse else None
    lse_ptr, lse_len = (lse.data_ptr(), lse.numel()) if lse is not None else (None, 0)
    c, _keep = config._c()
    handle = _cuda_context(context, device)
    stream = _stream(torch, device)
    lib = library()
    p = None
    if kind == "attention":
        p = None if plan is None else _device_plan(torch, plan, device)
        plan_ptr, plan_len = (p.data_ptr(), p.numel()) if p is not None else (None, 0)
        _check(lib.da_cuda_attention(handle, ctypes.byref(c), plan_ptr, plan_len, *_refs(tensors), lse_ptr, lse_len,
                                     stream))
    elif kind == "exact":
        _check(lib.da_cuda_exact_attention(handle, ctypes.byref(c), *_refs(tensors), lse_ptr, lse_len, stream))
    else:
        p = _plan_tensor(torch, q, config, device) if return_plan else None
        plan_ptr, plan_len = (p.data_ptr(), p.numel()) if p is not None else (None, 0)
        _check(lib.da_cuda_forward(handle, ctypes.byref(c), *_refs(tensors), lse_ptr, lse_len, plan_ptr, plan_len,
                                   stream))
    result = (out,) + ((lse,) if return_lse else ()) + ((p,) if return_plan else ())
    return result if len(result) > 1 else out


def _all_exact(config: Config, q_heads: int) -> bool:
    """Whether every query head has G = 1 (no plan needed)."""
    sizes = config.group_sizes if config.group_sizes is not None else [config.group_size] * q_heads
    return all(g == 1 for g in sizes)


def _aligned(x):
    """``x``, or a dense copy where it is not contiguous or not 16-byte aligned
    (the kernels read an output gradient of the inputs' type as an mma operand)."""
    if not x.is_contiguous() or x.data_ptr() % 16:
        return x.clone(memory_format=_torch().contiguous_format)
    return x


def _cuda_backward(exact: bool, q, k, v, out, lse, d_out, plan, config: Config, dq=None, dk=None, dv=None,
                   grad_dtype=None, context=None):
    """``da_cuda_attention_backward`` (on ``plan``; None when every head has G = 1)
    or, with ``exact``, ``da_cuda_exact_attention_backward``, on the current
    stream, with a workspace from PyTorch's caching allocator (stream-ordered,
    like any temporary of a torch op). Returns ``(dq, dk, dv)`` in
    ``grad_dtype`` (None: ``q``'s dtype)."""
    torch = _torch()
    device = q.device
    gd = grad_dtype or q.dtype
    dq = torch.empty(q.shape, dtype=gd, device=device) if dq is None else dq
    dk = torch.empty(k.shape, dtype=gd, device=device) if dk is None else dk
    dv = torch.empty(v.shape, dtype=gd, device=device) if dv is None else dv
    names = ("q", "k", "v", "out", "d_out", "dq", "dk", "dv")
    tensors = _cuda_descs(list(zip((q, k, v, out, d_out, dq, dk, dv), names)), device)
    if not (_is_cuda(lse) and lse.device == device and lse.dtype == torch.float32 and lse.is_contiguous()):
        raise ValueError(f"lse: expected a contiguous float32 CUDA tensor on {device} (the forward's)")
    lib = library()
    c, _keep = config._c()
    # The exact backward needs the (smaller) workspace of G = 1.
    cq, _keep_q = (dataclasses.replace(config, group_size=1, group_sizes=None) if exact else config)._c()
    size = _SIZE()
    _check(lib.da_cuda_backward_workspace_size(ctypes.byref(cq), ctypes.byref(tensors[0]), ctypes.byref(tensors[4]),
                                               ctypes.byref(size)))
    handle = _cuda_context(context, device)
    workspace = torch.empty((size.value + 3) // 4, dtype=torch.float32, device=device)
    stream = _stream(torch, device)
    lse_args = (lse.data_ptr(), lse.numel())
    ws_args = (workspace.data_ptr(), workspace.numel() * 4)
    if exact:
        _check(lib.da_cuda_exact_attention_backward(handle, ctypes.byref(c), *_refs(tensors[:4]), *lse_args,
                                                    *_refs(tensors[4:]), *ws_args, stream))
    else:
        p = None if plan is None else _device_plan(torch, plan, device)
        plan_args = (p.data_ptr(), p.numel()) if p is not None else (None, 0)
        _check(lib.da_cuda_attention_backward(handle, ctypes.byref(c), *plan_args, *_refs(tensors[:4]), *lse_args,
                                              *_refs(tensors[4:]), *ws_args, stream))
    return dq, dk, dv


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


def plan(q, config: Optional[Config] = None, context: Optional[Context] = None, k=None):
    """The plan of ``q``: uint16 ``[batch, heads, blocks, head_dim]``, one
    permutation of the head-dimension columns per query block. With ``k``, the
    plan for attention over those keys (``da_plan_with_keys``): needed for
    ``grouping="key_weighted"``, the same plan in the other modes.

    On a CUDA tensor (f16/bf16; LSH or similarity grouping, ``k`` unused;
    key-weighted plans on CUDA come from :func:`forward`): a uint16 tensor on
    its device, computed on its current stream."""
    if _is_cuda(q):
        return _cuda_plan(q, config or Config(), context)
    np = _np()
    config = config or Config()
    s = plan_shape(q, config)
    c, _keep = config._c()
    t = _describe(q, "q")
    p = np.empty((s["batch"], s["heads"], s["blocks"], s["head_dim"]), dtype=np.uint16)
    if k is None:
        _check(library().da_plan(_context(context), ctypes.byref(c), ctypes.byref(t), p.ctypes.data, p.size))
    else:
        tk = _describe(k, "k")
        _check(library().da_plan_with_keys(_context(context), ctypes.byref(c), ctypes.byref(t), ctypes.byref(tk),
                                           p.ctypes.data, p.size))
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
              context: Optional[Context] = None, out_dtype=None):
    """DistrAttention of ``q`` over ``k``, ``v`` with a given plan (from
    :func:`plan` or another backend). Returns the float32 output
    ``[batch, q_len, q_heads, v_dim]`` (written into ``out`` if given), and
    the log-sum-exp ``[batch, q_heads, q_len]`` with ``return_lse``.

    On CUDA tensors: the output in ``out_dtype`` (torch.float32, or None for
    ``q``'s dtype) on their device; ``plan`` a tensor or array (copied to the
    device), or None when every head has G = 1."""
    if _is_cuda(q):
        return _cuda_attend("attention", q, k, v, config or Config(), plan=plan, out=out, out_dtype=out_dtype,
                            return_lse=return_lse, context=context)
    np = _np()
    c, _keep = (config or Config())._c()
    plan = np.ascontiguousarray(plan, dtype=np.uint16)
    tensors, out, lse, lse_ptr, lse_len = _attention_args(np, q, k, v, out, return_lse)
    _check(library().da_attention(_context(context), ctypes.byref(c), plan.ctypes.data, plan.size,
                                  *_refs(tensors), lse_ptr, lse_len))
    return (out, lse) if return_lse else out


def exact_attention(q, k, v, config: Optional[Config] = None, out=None, return_lse: bool = False,
                    context: Optional[Context] = None, out_dtype=None):
    """Exact attention (every head G = 1); ``causal`` and ``scale`` of the config
    apply. CUDA tensors as for :func:`attention`."""
    if _is_cuda(q):
        return _cuda_attend("exact", q, k, v, config or Config(), out=out, out_dtype=out_dtype,
                            return_lse=return_lse, context=context)
    np = _np()
    c, _keep = (config or Config())._c()
    tensors, out, lse, lse_ptr, lse_len = _attention_args(np, q, k, v, out, return_lse)
    _check(library().da_exact_attention(_context(context), ctypes.byref(c), *_refs(tensors), lse_ptr, lse_len))
    return (out, lse) if return_lse else out


def forward(q, k, v, config: Optional[Config] = None, out=None, return_lse: bool = False,
            return_plan: bool = False, context: Optional[Context] = None, out_dtype=None):
    """One-shot DistrAttention: plan ``q``, then attend. Returns the output,
    followed by the lse and/or the plan when asked for. CUDA tensors as for
    :func:`attention` (the plan a uint16 tensor on their device)."""
    config = config or Config()
    if _is_cuda(q):
        return _cuda_attend("forward", q, k, v, config, out=out, out_dtype=out_dtype, return_lse=return_lse,
                            return_plan=return_plan, context=context)
    np = _np()
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


# --- backward pass -------------------------------------------------------------


def _backward_args(np, q, k, v, out, lse, d_out, dq, dk, dv):
    tensors = [_describe(q, "q"), _describe(k, "k"), _describe(v, "v"), _describe(out, "out")]
    lse = np.ascontiguousarray(lse, dtype=np.float32)
    grads = [
        _output(np, dq, q.shape, "dq"),
        _output(np, dk, k.shape, "dk"),
        _output(np, dv, v.shape, "dv"),
    ]
    descs = [_describe(d_out, "d_out")] + [_describe(g, n, writable=True) for g, n in zip(grads, ("dq", "dk", "dv"))]
    return tensors, lse, descs, grads


def attention_backward(q, k, v, out, lse, d_out, plan, config: Optional[Config] = None, dq=None, dk=None, dv=None,
                       context: Optional[Context] = None, grad_dtype=None):
    """Gradients of DistrAttention on ``plan`` with respect to ``q``, ``k``, ``v``.

    ``out``, ``lse`` and ``plan`` are the forward's (``forward(...,
    return_lse=True, return_plan=True)``), ``d_out`` the gradient of the loss
    with respect to ``out`` (float32, shaped like it); the config is the
    forward's. Returns float32 ``(dq, dk, dv)`` shaped like ``q``, ``k``, ``v``
    (written into ``dq``, ``dk``, ``dv`` if given). The plan carries no gradient.

    On CUDA tensors (``da_cuda_attention_backward``, on the current stream):
    ``out`` and ``d_out`` float32 or ``q``'s dtype (keep ``out`` in float32
    for training: ``forward(..., out_dtype=torch.float32)``), ``lse`` the
    forward's float32 tensor, ``plan`` a tensor or array (None when every head
    has G = 1); the gradients in ``grad_dtype`` (torch.float32, or None for
    ``q``'s dtype) on the inputs' device. ``context`` a :class:`CudaContext`.
    """
    if _is_cuda(q):
        return _cuda_backward(False, q, k, v, out, lse, d_out, plan, config or Config(), dq, dk, dv, grad_dtype,
                              context)
    np = _np()
    c, _keep = (config or Config())._c()
    plan = np.ascontiguousarray(plan, dtype=np.uint16)
    tensors, lse, descs, grads = _backward_args(np, q, k, v, out, lse, d_out, dq, dk, dv)
    _check(library().da_attention_backward(_context(context), ctypes.byref(c), plan.ctypes.data, plan.size,
                                           *_refs(tensors), lse.ctypes.data, lse.size, *_refs(descs)))
    return tuple(grads)


def exact_attention_backward(q, k, v, out, lse, d_out, config: Optional[Config] = None, dq=None, dk=None, dv=None,
                             context: Optional[Context] = None, grad_dtype=None):
    """Gradients of exact attention (``out`` and ``lse`` from :func:`exact_attention`).
    CUDA tensors as for :func:`attention_backward`."""
    if _is_cuda(q):
        return _cuda_backward(True, q, k, v, out, lse, d_out, None, config or Config(), dq, dk, dv, grad_dtype,
                              context)
    np = _np()
    c, _keep = (config or Config())._c()
    tensors, lse, descs, grads = _backward_args(np, q, k, v, out, lse, d_out, dq, dk, dv)
    _check(library().da_exact_attention_backward(_context(context), ctypes.byref(c), *_refs(tensors),
                                                 lse.ctypes.data, lse.size, *_refs(descs)))
    return tuple(grads)


# --- error estimates and the planner -----------------------------------------------


def estimate_errors(q, k, v, plan=None, config: Optional[Config] = None, sample_rows: int = 16,
                    context: Optional[Context] = None) -> dict:
    """Per-(batch, query head) estimates of the error DistrAttention causes on
    ``plan`` (None: the plan :func:`forward` would use): a dict of float64
    ``[batch, q_heads]`` arrays ``relative_score_error``, ``rms_logit_error`` and
    ``sampled_output_error`` (the relative output error on ``sample_rows``
    evenly spaced rows, computed exactly; NaN for 0 rows). Heads with G = 1 get 0
    (the sampled error up to f64 rounding)."""
    np = _np()
    c, _keep = (config or Config())._c()
    tensors = [_describe(q, "q"), _describe(k, "k"), _describe(v, "v")]
    shape = (q.shape[0], q.shape[2])
    result = {name: np.empty(shape, dtype=np.float64)
              for name in ("relative_score_error", "rms_logit_error", "sampled_output_error")}
    plan_ptr, plan_len = None, 0
    if plan is not None:
        plan = np.ascontiguousarray(plan, dtype=np.uint16)
        plan_ptr, plan_len = plan.ctypes.data, plan.size
    outs = [a.ctypes.data for a in result.values()]
    _check(library().da_estimate_errors(_context(context), ctypes.byref(c), plan_ptr, plan_len, *_refs(tensors),
                                        sample_rows, *outs, shape[0] * shape[1]))
    return result


@dataclass
class BudgetPlan:
    """The planner's choice for one layer (``da_choose_group_sizes``)."""

    #: G per query head (1 = exact), usable as ``Config.group_sizes``.
    group_sizes: list
    #: Worst measured relative output error per head at its G (0 for G = 1).
    measured_error: list
    #: Worst estimated error (``sampled_output_error``, 16 rows) per head.
    estimated_error: list
    #: Fraction of the attention FLOPs saved.
    flop_saving: float
    #: Whether the target was reached (a FLOP target can be out of reach).
    target_met: bool


def choose_group_sizes(samples, max_error: Optional[float] = None, flop_saving: Optional[float] = None,
                       candidates: Sequence[int] = (2, 4, 8), config: Optional[Config] = None) -> BudgetPlan:
    """The error-budget planner: chooses G per query head of one layer from
    calibration ``samples`` (a sequence of ``(q, k, v)`` arrays of that layer),
    for ``max_error`` (largest relative output error of an approximated head on
    every sample) or ``flop_saving`` (fraction of attention FLOPs to save).
    The config's grouping mode, block rows, fusion, mask and scale are used,
    its group sizes ignored."""
    if (max_error is None) == (flop_saving is None):
        raise ValueError("give exactly one of max_error and flop_saving")
    kind, target = (BUDGET_TARGET_MAX_ERROR, max_error) if max_error is not None else \
        (BUDGET_TARGET_FLOP_SAVING, flop_saving)
    samples = list(samples)
    c, _keep = (config or Config())._c()
    arrays = [(_Tensor * len(samples))(*[_describe(s[i], name) for s in samples])
              for i, name in enumerate(("q", "k", "v"))]
    cands = (ctypes.c_uint32 * len(candidates))(*candidates)
    heads = samples[0][0].shape[2] if samples else 0
    sizes = (ctypes.c_uint32 * max(heads, 1))()
    measured, estimated = (ctypes.c_double * max(heads, 1))(), (ctypes.c_double * max(heads, 1))()
    saving, met = ctypes.c_double(), ctypes.c_uint32()
    _check(library().da_choose_group_sizes(
        ctypes.byref(c), *[ctypes.addressof(a) for a in arrays], len(samples),
        ctypes.addressof(cands) if len(candidates) else None, len(candidates), kind, float(target),
        ctypes.addressof(sizes), ctypes.addressof(measured), ctypes.addressof(estimated), heads,
        ctypes.addressof(saving), ctypes.addressof(met)))
    return BudgetPlan(list(sizes[:heads]), list(measured[:heads]), list(estimated[:heads]), saving.value,
                      bool(met.value))


def _table_call(table, layer: str, file: Optional[str], sizes, capacity: int, count, config) -> None:
    lib = library()
    layer_b = layer.encode()
    file_b = None if file is None else file.encode()
    if isinstance(table, (bytes, bytearray)) or (isinstance(table, str) and table.lstrip().startswith("{")):
        text = table.encode() if isinstance(table, str) else bytes(table)
        _check(lib.da_load_group_sizes(text, len(text), file_b, layer_b, sizes, capacity, count, config))
    else:
        _check(lib.da_load_group_sizes_file(os.fsencode(table), file_b, layer_b, sizes, capacity, count, config))


def load_group_sizes(table, layer: str, file: Optional[str] = None) -> list:
    """The per-head group sizes of ``layer`` from a planner table (JSON text as
    ``str``/``bytes``, or a path): what ``examples/plan_heads.rs --out`` wrote.
    ``file`` names the calibration file (its path as in the table, or its last
    components) when the layer name is in several."""
    count = _SIZE()
    _table_call(table, layer, file, None, 0, ctypes.byref(count), None)
    sizes = (ctypes.c_uint32 * count.value)()
    _table_call(table, layer, file, ctypes.addressof(sizes), count.value, ctypes.byref(count), None)
    return list(sizes)


def config_from_table(table, layer: str, file: Optional[str] = None, base: Optional[Config] = None) -> Config:
    """``base`` (default: the defaults) with the table's ``block_rows`` and
    ``grouping`` (the planner's) and the layer's per-head group sizes."""
    base = base or Config()
    sizes = load_group_sizes(table, layer, file)
    c, _keep = base._c()
    count = _SIZE()
    buf = (ctypes.c_uint32 * len(sizes))()
    _table_call(table, layer, file, ctypes.addressof(buf), len(buf), ctypes.byref(count), ctypes.byref(c))
    return dataclasses.replace(base, block_rows=c.block_rows, grouping=_GROUPING_NAMES[c.grouping],
                               group_sizes=list(buf))


# --- PyTorch -------------------------------------------------------------------------
#
# torch is imported when one of these is used, never at import time. The
# tensors are described by data pointer and strides (`_describe_torch`); CPU
# tensors are computed on in float32 (copies where needed).


def _torch():
    try:
        import torch
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError("this part of distr_attention needs PyTorch: pip install torch") from e
    return torch


_FUNCTION = None


def _function_class():
    """The ``torch.autograd.Function``, defined on first use (it subclasses a torch class)."""
    global _FUNCTION
    if _FUNCTION is not None:
        return _FUNCTION
    torch = _torch()

    class DistrAttentionFunction(torch.autograd.Function):
        """DistrAttention as a differentiable op: ``apply(q, k, v, config)``
        with ``[batch, seq, heads, head_dim]`` tensors (GQA: fewer KV heads),
        returning the output in ``q``'s dtype. The forward computes the plan
        (any grouping mode) and the log-sum-exp; the backward uses both (the
        plan carries no gradient). CPU tensors are computed in float32.

        CUDA tensors (float16 or bfloat16; float32 raises TypeError, the GPU
        kernels have none) run on the current stream: when a gradient is
        needed the forward writes a float32 output (returned rounded to
        ``q``'s dtype), keeps it with the log-sum-exp and the GPU plan (any
        grouping mode), and the backward runs ``da_cuda_attention_backward``
        on them; gradients come back in the inputs' dtype."""

        @staticmethod
        def forward(ctx, q, k, v, config=None):
            config = config or Config()
            ctx.cuda = _is_cuda(q)
            if ctx.cuda:
                if q.dtype not in (torch.float16, torch.bfloat16):
                    raise TypeError(
                        f"distr_attention: CUDA tensors must be float16 or bfloat16, got {q.dtype} (the GPU kernels "
                        "have no float32 path): cast them, e.g. under torch.autocast, or use CPU tensors")
                if not any(ctx.needs_input_grad[:3]):
                    return forward(q.detach(), k.detach(), v.detach(), config)
                # Training: keep O in float32 (Delta = rowsum(dO * O) in the
                # backward inherits O's rounding), the lse and the plan.
                exact = _all_exact(config, q.shape[2])
                result = forward(q.detach(), k.detach(), v.detach(), config, return_lse=True, return_plan=not exact,
                                 out_dtype=torch.float32)
                out, lse = result[0], result[1]
                plan = None if exact else result[2]
                ctx.save_for_backward(q, k, v, out, lse, plan)
                ctx.config = config
                # Mixed group sizes sum dK, dV over launches: in float32, then rounded once.
                mixed = config.group_sizes is not None and len(set(config.group_sizes)) > 1
                ctx.grad_dtype = torch.float32 if mixed else None
                return out.to(q.dtype)
            for x, name in ((q, "q"), (k, "k"), (v, "v")):
                _host_only(x, name)
            q32, k32, v32 = (x.detach().to(torch.float32).contiguous() for x in (q, k, v))
            b, n, hq, _ = q32.shape
            out = torch.empty((b, n, hq, v32.shape[3]), dtype=torch.float32)
            lse = torch.empty((b, hq, n), dtype=torch.float32)
            c, keep = config._c()
            tensors = [_describe(x, name) for x, name in ((q32, "q"), (k32, "k"), (v32, "v"), (out, "out"))]
            shape = _PlanShape()
            _check(library().da_get_plan_shape(ctypes.byref(c), ctypes.byref(tensors[0]), ctypes.byref(shape)))
            plan = (ctypes.c_uint16 * max(shape.num_entries, 1))()
            _check(library().da_forward(_context(None), ctypes.byref(c), *_refs(tensors), lse.data_ptr(), lse.numel(),
                                        ctypes.addressof(plan), shape.num_entries))
            del keep
            ctx.save_for_backward(q32, k32, v32, out, lse)
            ctx.plan = plan
            ctx.num_entries = shape.num_entries
            ctx.config = config
            ctx.dtypes = (q.dtype, k.dtype, v.dtype)
            return out.to(q.dtype)

        @staticmethod
        def backward(ctx, d_out):
            if ctx.cuda:
                q, k, v, out, lse, plan = ctx.saved_tensors
                grads = _cuda_backward(plan is None, q.detach(), k.detach(), v.detach(), out, lse,
                                       _aligned(d_out.detach()), plan, ctx.config, grad_dtype=ctx.grad_dtype)
                return tuple(g.to(x.dtype) for g, x in zip(grads, (q, k, v))) + (None,)
            q32, k32, v32, out, lse = ctx.saved_tensors
            _host_only(d_out, "d_out")
            g = d_out.detach().to(torch.float32).contiguous()
            dq, dk, dv = (torch.empty_like(x) for x in (q32, k32, v32))
            c, keep = ctx.config._c()
            tensors = [_describe(x, n) for x, n in ((q32, "q"), (k32, "k"), (v32, "v"), (out, "out"))]
            descs = [_describe(x, n) for x, n in ((g, "d_out"), (dq, "dq"), (dk, "dk"), (dv, "dv"))]
            _check(library().da_attention_backward(_context(None), ctypes.byref(c), ctypes.addressof(ctx.plan),
                                                   ctx.num_entries, *_refs(tensors), lse.data_ptr(), lse.numel(),
                                                   *_refs(descs)))
            del keep
            tq, tk, tv = ctx.dtypes
            return dq.to(tq), dk.to(tk), dv.to(tv), None

    _FUNCTION = DistrAttentionFunction
    return _FUNCTION


def __getattr__(name):
    # `distr_attention.DistrAttentionFunction` exists once torch can be imported.
    if name == "DistrAttentionFunction":
        return _function_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def distr_attention(q, k, v, config: Optional[Config] = None):
    """Differentiable DistrAttention on torch tensors ``[batch, seq, heads,
    head_dim]`` (CPU, or CUDA in float16/bfloat16): :class:`DistrAttentionFunction` applied."""
    return _function_class().apply(q, k, v, config)


#: The config :func:`hf_attention` uses for modules without their own
#: ``distr_attention_config``: a Config, or a callable ``module -> Config``
#: (e.g. per layer from a planner table, by ``module.layer_idx``).
_HF_CONFIG: Union[Config, Callable, None] = None


def _hf_config(module) -> Config:
    cfg = getattr(module, "distr_attention_config", None)
    if cfg is None:
        cfg = _HF_CONFIG
    if cfg is not None and not isinstance(cfg, Config):
        cfg = cfg(module)
    return cfg or Config()


def _hf_causal(torch, module, attention_mask, n: int, m: int, kwargs) -> bool:
    """Whether the call is causal, from ``is_causal`` and the mask. The library
    computes no mask or the bottom-right aligned causal mask; any other mask
    (padding, sliding windows, additive biases) is refused, not ignored."""
    is_causal = kwargs.get("is_causal")
    if is_causal is None:
        is_causal = getattr(module, "is_causal", True)
    if attention_mask is None:
        return bool(is_causal)
    mask = attention_mask
    if mask.dim() == 2:  # [batch, keys]: a padding mask
        allowed = mask.bool() if mask.dtype != torch.bool else mask
        if bool(allowed.all()):
            return bool(is_causal)
        raise ValueError("distr_attention: padding masks are not supported (no padded keys, please)")
    mask = mask[..., :m]
    if mask.dtype == torch.bool:
        allowed = mask
    else:
        masked = mask <= torch.finfo(mask.dtype).min / 2
        allowed = mask == 0
        if not bool((allowed | masked).all()):
            raise ValueError("distr_attention: additive attention biases are not supported")
    rows = torch.arange(n, device=mask.device)[:, None]
    cols = torch.arange(m, device=mask.device)[None, :]
    causal = (cols <= rows + (m - n)).expand(allowed.shape)
    if bool(allowed.all()):
        return False
    if bool((allowed == causal).all()):
        return True
    raise ValueError(
        "distr_attention: the attention mask is neither empty nor the causal mask (padding or a custom pattern); "
        "only those two are supported"
    )


def hf_attention(module, query, key, value, attention_mask, scaling: Optional[float] = None, dropout: float = 0.0,
                 **kwargs):
    """An attention function for Hugging Face ``transformers``
    (``AttentionInterface``): ``query`` ``[batch, heads, seq, head_dim]``,
    ``key``/``value`` with the model's KV heads (GQA, not repeated). Returns
    ``(output [batch, seq, heads, head_dim], None)``. Honours the causal mask
    (``is_causal`` or a causal ``attention_mask``) and ``scaling``; refuses
    padding masks, dropout in training, sliding windows and soft-capping. The
    config comes from ``module.distr_attention_config`` or
    :func:`register_transformers`."""
    torch = _torch()
    if dropout and getattr(module, "training", False):
        raise NotImplementedError("distr_attention: attention dropout is not supported")
    for name in ("sliding_window", "softcap"):
        if kwargs.get(name) is not None:
            raise NotImplementedError(f"distr_attention: {name} is not supported")
    q, k, v = (x.transpose(1, 2) for x in (query, key, value))
    # Under autocast SDPA computes in the autocast dtype; so do we. (Llama-style
    # models apply RoPE in float32, so Q and K arrive in float32 and V in the
    # autocast dtype; the CUDA kernels take float16/bfloat16 only.)
    device_type = q.device.type
    if torch.is_autocast_enabled(device_type):
        dtype = torch.get_autocast_dtype(device_type)
        q, k, v = (x.to(dtype) for x in (q, k, v))
    causal = _hf_causal(torch, module, attention_mask, q.shape[1], k.shape[1], kwargs)
    config = _hf_config(module)
    config = dataclasses.replace(config, causal=causal, scale=config.scale if scaling is None else float(scaling))
    return distr_attention(q, k, v, config), None


def register_transformers(config: Union[Config, Callable, None] = None, name: str = "distr_attention") -> str:
    """Registers :func:`hf_attention` with ``transformers.AttentionInterface``
    under ``name`` (then ``attn_implementation=name`` selects it), with
    ``config`` (a Config, or a callable ``module -> Config``) as the default
    config. Imports transformers. Returns ``name``."""
    global _HF_CONFIG
    import transformers

    if config is not None:
        _HF_CONFIG = config
    transformers.AttentionInterface.register(name, hf_attention)
    # Newer transformers build the attention mask per implementation and build
    # none for a name without a mask function: padding would go unseen. SDPA's
    # mask format (None or a boolean mask) is what hf_attention checks.
    try:
        from transformers.masking_utils import AttentionMaskInterface, sdpa_mask
    except ImportError:  # pragma: no cover - older transformers pass the model's mask as it is
        pass
    else:
        AttentionMaskInterface.register(name, sdpa_mask)
    return name


# Registered at import when transformers is already loaded (importing it here
# would make this module slow to import and torch a requirement).
if "transformers" in sys.modules:  # pragma: no cover - depends on the environment
    try:
        register_transformers()
    except Exception as e:
        import warnings

        warnings.warn(f"distr_attention: could not register with transformers: {e}")
