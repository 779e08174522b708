"""Results on the wire: plain objects by pickle, tensors by ``dist.broadcast``."""

from __future__ import annotations

import ctypes
import functools
import io
import mmap
import pickle
import sys
from collections.abc import Callable, Sequence
from typing import Any, Final, cast

import torch
import torch.distributed as dist

__all__ = ["Meta", "dumps", "loads", "meta", "off_wire", "on_wire", "receive_buffer", "wire_device"]

Meta = tuple[tuple[int, ...], torch.dtype, str, bool, bool]  # shape, dtype, device, grad, param


_TENSORS: Final = (torch.Tensor, torch.nn.Parameter)  # exact types: subclasses pickle as they do


def _tensor(index: int) -> torch.Tensor:
    """Where a result's tensor goes in its pickle.  Only :class:`_Unpickler`
    resolves it (to the tensor that came by broadcast)."""
    raise pickle.UnpicklingError(f"tensor {index} of a result read without its tensors")


class _Pickler(pickle.Pickler):
    """Takes a result's tensors out of its pickle.  ``reducer_override``,
    not ``persistent_id``: pickle calls it only for objects that are not
    of its built-in types (str, int, list, dict, ...), so a result of plain
    data pickles at C speed (a dict of 80 strings: 2 µs against 15).
    ``tensors`` is set after it is made (no Python ``__init__``: half a
    µs of every broadcast result)."""

    tensors: list[torch.Tensor]

    def reducer_override(self, obj: object) -> Any:  # a reduce tuple, or NotImplemented
        if type(obj) not in _TENSORS:
            return NotImplemented
        tensor = cast(torch.Tensor, obj)
        if (
            tensor.layout != torch.strided
            or tensor.is_quantized
            or tensor.device.type not in ("cpu", "cuda")
        ):
            return NotImplemented  # pickled like any other object
        # (pickle's memo sends the same tensor twice once, and it stays one)
        self.tensors.append(tensor)
        return _tensor, (len(self.tensors) - 1,)


class _Unpickler(pickle.Unpickler):
    tensors: list[torch.Tensor]  # (set after it is made, as the pickler's)

    def find_class(self, module: str, name: str) -> object:
        if module == __name__ and name == "_tensor":
            return self.tensors.__getitem__
        return super().find_class(module, name)


def dumps(payload: object, tensors: list[torch.Tensor] | None) -> bytes:
    """``payload`` pickled; with ``tensors``, its tensors are appended there
    instead (they travel by broadcast)."""
    if tensors is None:
        return pickle.dumps(payload, protocol=pickle.HIGHEST_PROTOCOL)
    buffer = io.BytesIO()
    pickler = _Pickler(buffer, pickle.HIGHEST_PROTOCOL)
    pickler.tensors = tensors
    pickler.dump(payload)
    return buffer.getvalue()


def loads(data: bytes, tensors: list[torch.Tensor]) -> object:
    """What :func:`dumps` wrote, with its tensors (as they came) put back."""
    if not tensors:
        return pickle.loads(data)  # no tensor: a plain pickle
    unpickler = _Unpickler(io.BytesIO(data))
    unpickler.tensors = tensors
    return unpickler.load()


def meta(tensor: torch.Tensor) -> Meta:
    return (
        tuple(tensor.shape),
        tensor.dtype,
        tensor.device.type,
        tensor.requires_grad,
        isinstance(tensor, torch.nn.Parameter),
    )


def wire_device(backend: str | None = None) -> torch.device:
    """Where tensors travel: ``backend`` names the process group's backend
    (default: the current group's; a name for a group still to be made)."""
    # NCCL moves CUDA tensors only; Gloo moves CPU tensors.
    if (dist.get_backend() if backend is None else backend) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


_HUGE_PAGE: Final = 2 << 20
_PAGE: Final = mmap.PAGESIZE
# glibc serves an allocation this large from a mapping of its own (its mmap
# threshold never rises above it on 64-bit), so advice given to the buffer's
# pages goes away with the buffer instead of staying on the heap.
_OWN_MAPPING: Final = 32 << 20
_MADV_HUGEPAGE: Final = 14  # Linux; harmless where transparent huge pages are off
_MADV_POPULATE_WRITE: Final = 23  # Linux 5.14+; older kernels refuse it, harmlessly


@functools.cache
def _madvise() -> Callable[[int, int, int], int] | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        fn = libc.madvise
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    fn.restype = ctypes.c_int
    return cast("Callable[[int, int, int], int]", fn)


def receive_buffer(shape: Sequence[int], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """An empty tensor for a broadcast to land in.

    Writing into fresh memory page-faults once per 4 KiB page, which costs a
    large CPU broadcast more than the copy itself (measured: 64 MiB over
    Gloo at 2 ranks, 32 ms into a new tensor against 15 ms into a reused
    one).  So a buffer of 32 MiB or more, which has a mapping of its own,
    asks for transparent huge pages on its 2 MiB-aligned interior (what
    torch's THP_MEM_ALLOC_ENABLE does, for this buffer only) and is faulted
    in with one call before the broadcast starts: about 21 ms.  Faulting
    huge pages in during the receive instead was faster at the median but
    had 50 to 180 ms outliers.  Both calls are advice: where the kernel
    refuses them, the buffer is an ordinary one.
    """
    tensor = torch.empty(shape, dtype=dtype, device=device)
    nbytes = tensor.numel() * tensor.element_size()
    if device.type == "cpu" and nbytes >= _OWN_MAPPING and (madvise := _madvise()):
        start, end = tensor.data_ptr(), tensor.data_ptr() + nbytes
        first = -(-start // _HUGE_PAGE) * _HUGE_PAGE
        last = end // _HUGE_PAGE * _HUGE_PAGE
        if last > first:
            madvise(first, last - first, _MADV_HUGEPAGE)
        page = start // _PAGE * _PAGE
        madvise(page, -(-end // _PAGE) * _PAGE - page, _MADV_POPULATE_WRITE)
    return tensor


def on_wire(tensor: torch.Tensor, device: torch.device | None = None) -> torch.Tensor:
    device = wire_device() if device is None else device
    return tensor.detach().resolve_conj().resolve_neg().to(device).contiguous()


def off_wire(wire: torch.Tensor, meta: Meta) -> torch.Tensor:
    # A tensor comes back where the main rank had it: CPU stays CPU, a CUDA
    # tensor lands on this rank's current CUDA device.
    _, _, device_type, requires_grad, is_parameter = meta
    if device_type == "cpu":
        tensor = wire.cpu()
    elif device_type == "cuda":
        tensor = wire.to(torch.device("cuda", torch.cuda.current_device()))
    else:
        tensor = wire
    if is_parameter:
        return torch.nn.Parameter(tensor, requires_grad=requires_grad)
    return tensor.requires_grad_(requires_grad)
