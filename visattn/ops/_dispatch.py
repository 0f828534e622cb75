"""Backend selection and input checks shared by every op of ``visattn.ops``.

``backend='auto'`` picks Triton when the tensors are on a CUDA device and Triton is importable, else the PyTorch
path; the environment variable ``VISATTN_BACKEND`` (``'torch'`` or ``'triton'``) overrides ``'auto'`` (never an
explicit choice). ``backend='triton'`` on the CPU runs the kernels in Triton's interpreter, which needs
``TRITON_INTERPRET=1`` in the environment before the kernels are first used.
"""

from __future__ import annotations

import functools
import importlib.util
import os
from collections.abc import Callable, Sequence

import torch
from torch import Tensor

BACKENDS = ('auto', 'torch', 'triton')
FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)  # float64: PyTorch path only


def triton_available() -> bool:
    """True when the ``triton`` package can be imported (checked without importing it)."""
    return importlib.util.find_spec('triton') is not None


def interpret_mode() -> bool:
    """True when Triton kernels run in the CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get('TRITON_INTERPRET', '0').strip().lower() in ('1', 'true', 'on', 'yes')


def resolve_backend(backend: str, *tensors: Tensor | None, op: str) -> str:
    """The backend that runs ``op``: ``'torch'`` or ``'triton'``.

    Args:
        backend: ``'auto'``, ``'torch'`` or ``'triton'``.
        tensors: the op's tensor inputs (``None`` entries are skipped); their device decides ``'auto'``.
        op: the op's name, for error messages.

    Raises:
        ValueError: unknown ``backend`` or ``VISATTN_BACKEND``; ``'triton'`` where it cannot run.
    """
    if backend not in BACKENDS:
        raise ValueError(f'{op}: backend must be one of {BACKENDS}, got {backend!r}')
    on_cuda = all(t.is_cuda for t in tensors if t is not None)
    float64 = any(t.dtype == torch.float64 for t in tensors if t is not None)
    if backend == 'auto':
        env = os.environ.get('VISATTN_BACKEND', '').strip().lower()
        if env in ('', 'auto'):
            return 'triton' if on_cuda and triton_available() and not float64 else 'torch'
        if env not in ('torch', 'triton'):
            raise ValueError(f"{op}: environment variable VISATTN_BACKEND must be 'auto', 'torch' or 'triton', "
                             f'got {env!r}')
        backend = env
    if backend == 'triton':
        if float64:
            raise TypeError(f"{op}: the Triton kernels take float32, float16 or bfloat16 tensors, got float64; "
                            "use backend='torch' for float64")
        if not triton_available():
            raise ValueError(f"{op}: backend='triton' needs the triton package, which is not installed; "
                             "use backend='torch'")
        if not on_cuda and not interpret_mode():
            raise ValueError(f"{op}: backend='triton' on CPU tensors needs TRITON_INTERPRET=1 in the environment "
                             "(Triton's interpreter); move the tensors to a CUDA device or use backend='torch'")
    return backend


def check_tensor(x: Tensor, name: str, op: str, dims: int, layout: str) -> None:
    """Raise unless ``x`` is a floating tensor of ``dims`` dimensions (fp32, fp16, bf16; fp64 on the torch path)."""
    if not isinstance(x, Tensor):
        raise TypeError(f'{op}: {name} must be a torch.Tensor, got {type(x).__name__}')
    if x.dim() != dims:
        raise ValueError(f'{op}: {name} must be {layout} ({dims} dims), got shape {tuple(x.shape)}')
    if x.dtype not in FLOAT_DTYPES:
        raise TypeError(f'{op}: {name} must be float32, float16, bfloat16 or float64, got {x.dtype}')


def check_same(tensors: Sequence[Tensor], names: Sequence[str], op: str) -> None:
    """Raise unless all ``tensors`` share one dtype and one device."""
    first, first_name = tensors[0], names[0]
    for t, n in zip(tensors[1:], names[1:]):
        if t.dtype != first.dtype:
            raise TypeError(f'{op}: {n} has dtype {t.dtype}, expected {first.dtype} like {first_name}')
        if t.device != first.device:
            raise ValueError(f'{op}: {n} is on {t.device}, expected {first.device} like {first_name}')


def check_qkv(q: Tensor, k: Tensor, v: Tensor, op: str, layout: str) -> None:
    """Raise unless q, k, v are floating tensors in ``layout`` (e.g. ``'[B, H, N, D]'``) of one dtype and device,
    ``k`` shaped as ``q`` and ``v`` matching them in all but the last dimension."""
    dims = layout.count(',') + 1
    for t, name in ((q, 'q'), (k, 'k'), (v, 'v')):
        check_tensor(t, name, op, dims, layout)
    check_same((q, k, v), ('q', 'k', 'v'), op)
    if k.shape != q.shape:
        raise ValueError(f'{op}: k must have the shape of q {tuple(q.shape)}, got {tuple(k.shape)}')
    if v.shape[:-1] != q.shape[:-1]:
        lead = layout.rsplit(',', 1)[0].strip('[')
        raise ValueError(f'{op}: v must be {layout[:-2]}Dv] with {lead} = {tuple(q.shape[:-1])}, got {tuple(v.shape)}')


def check_positive_int(value: int, name: str, op: str, minimum: int = 1) -> int:
    """Raise unless ``value`` is an int >= ``minimum``."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f'{op}: {name} must be an int, got {type(value).__name__}')
    if value < minimum:
        raise ValueError(f'{op}: {name} must be >= {minimum}, got {value}')
    return value


def check_scale(scale: float | None, dim: int, op: str) -> float:
    """``scale``, or ``1/sqrt(dim)`` when None; raise unless it is a finite positive number."""
    if scale is None:
        return dim ** -0.5
    if isinstance(scale, bool) or not isinstance(scale, (int, float)):
        raise TypeError(f'{op}: scale must be a float or None, got {type(scale).__name__}')
    if not 0 < scale < float('inf'):
        raise ValueError(f'{op}: scale must be a finite positive number, got {scale}')
    return float(scale)


def upcast(x: Tensor) -> Tensor:
    """``x`` in float32 if it is float16/bfloat16 (float32 accumulation), else unchanged (float64 stays)."""
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


def bf16_via_fp32(fn: Callable[..., Tensor]) -> Callable[..., Tensor]:
    """Wrap a Triton path so that, in the interpreter, bfloat16 tensor arguments run in float32 and the result
    returns to bfloat16 (the interpreter's bfloat16 arithmetic is wrong); on a GPU it changes nothing."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        tensors = [a for a in (*args, *kwargs.values()) if isinstance(a, Tensor)]
        if not interpret_mode() or not any(t.dtype == torch.bfloat16 for t in tensors):
            return fn(*args, **kwargs)

        def up(a):
            return a.float() if isinstance(a, Tensor) and a.dtype == torch.bfloat16 else a

        out = fn(*(up(a) for a in args), **{k: up(a) for k, a in kwargs.items()})
        return out.to(torch.bfloat16)

    return wrapper


def tile_rows(dk: int, dv: int, element_size: int) -> int:
    """Rows of a q/k/v tile in the tensor-core kernels: 64, or 32 / 16 for wide heads in wide dtypes, so that a
    kernel's shared memory stays within a GPU's ~227 KiB per block."""
    widest = max(dk, dv) * element_size
    return 64 if widest <= 256 else 32 if widest <= 512 else 16
