"""GPU-path helpers: the fast-math switches, the device peak table, and host-sync detection.

    enable_fast_math()                      # TF32 matmuls/convolutions and cuDNN autotuning (CUDA only)
    with ieee_fp32():                       # TF32 off for the duration: fp32 math that is fp32 (CUDA only)
        features = inception(images)
    peak_bf16_tflops("cuda")                # 989.0 on an H100/H200 SXM, None where unknown (CPU)
    with no_host_sync("cuda"):              # raises on the first op that makes the host wait for the device
        training_step(...)

A host sync (`.item()`, `bool(t)`, `nonzero`, a copy of fresh host data to the GPU, ...) stalls the CPU until
the GPU has drained its queue, so the next kernels are launched late and the GPU idles. On CUDA, `no_host_sync`
turns on torch's own detector (`torch.cuda.set_sync_debug_mode("error")`). On any device, including the CPU of
CI, it also runs the ops under `HostSyncDetector`, which flags the operators that would sync on CUDA, and the
explicit copies to the host (`.cpu()`, `.tolist()`, `.numpy()`, `.to("cpu")` of a device tensor): the same code
path can then be proven sync-free without a GPU.
"""

from __future__ import annotations

import contextlib
import os
import traceback
from collections import Counter

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

# Dense bf16 peak (TFLOP/s, no sparsity: half of NVIDIA's datasheet figure "with sparsity") by device-name
# fragment; the first match wins, so the PCIe and NVL cards come before the SXM names they contain
# ("NVIDIA H100 NVL" and "NVIDIA H100 80GB HBM3" both contain "H100"). NVL: 1,671 sparse per GPU (H100 NVL and
# H200 NVL datasheets), lower clocks and power than SXM.
PEAK_BF16_TFLOPS: tuple[tuple[str, float], ...] = (
    ("H100 PCIe", 756.0),
    ("H100 NVL", 835.0),
    ("H200 NVL", 835.0),
    ("H100", 989.0),
    ("H200", 989.0),
    ("H800", 989.0),
    ("A100", 312.0),
    ("A800", 312.0),
)

# aten operators (by overload packet) that make the host wait for a CUDA device: reading a value
# (`_local_scalar_dense` is what .item(), bool(), int() and float() dispatch to; `equal` returns a Python bool),
# outputs whose size depends on the data, sampling that reads the result, device-side asserts, and `lift_fresh`
# (a tensor built from Python data: on GPU that is a blocking host-to-device copy).
SYNCING_OPS = frozenset({
    "_local_scalar_dense", "equal", "nonzero", "argwhere", "bincount", "masked_select", "_unique2", "unique_dim",
    "unique_consecutive", "repeat_interleave", "multinomial", "_assert_async", "lift_fresh",
})  # fmt: skip
# indexing (reads and writes) with a boolean mask runs nonzero() inside the kernel, below the dispatcher
BOOL_INDEXED_OPS = frozenset({"index", "index_put", "index_put_", "_index_put_impl_"})
# Tensor methods that copy to the host whatever device the tensor is on: on a GPU each is a blocking
# device-to-host copy. On a CPU tensor they never reach the dispatcher (`.cpu()` returns the tensor itself), so
# they are caught at the Python API (__torch_function__), where CPU code calls them exactly as GPU code would.
HOST_PULLS = {torch.Tensor.cpu: "Tensor.cpu", torch.Tensor.tolist: "Tensor.tolist",
              torch.Tensor.numpy: "Tensor.numpy", torch.Tensor.__array__: "Tensor.__array__"}  # fmt: skip


def enable_fast_math() -> None:
    """TF32 for fp32 matmuls and convolutions (bf16-mixed runs keep a few in fp32) and cuDNN autotuning for the
    fixed input shapes of training. No effect on CPU."""
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    torch.backends.cudnn.benchmark = True


@contextlib.contextmanager
def ieee_fp32():
    """TF32 off for fp32 matmuls and convolutions for the duration, then the previous switches restored (also on
    an error): for the numbers that are reported as fp32 (metrics, the quantizer's nearest-code search). On
    Ampere and later GPUs TF32 keeps 10 mantissa bits, and cuDNN uses it for fp32 convolutions by default, even
    without `enable_fast_math`. The switches are the same legacy `allow_tf32` flags `enable_fast_math` sets:
    torch refuses to read them (a RuntimeError, seen with torch 2.14) once the newer `fp32_precision` API has set
    them differently. They are process-wide (not per thread), and have no effect on CPU."""
    matmul, cudnn = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = matmul
        torch.backends.cudnn.allow_tf32 = cudnn


def tf32_as_now():
    """A context manager that sets the TF32 switches as they are at this call, for the duration (then restores
    them). What a checkpointed function's replay runs under (torch.utils.checkpoint's `context_fn`), so that the
    recomputation in backward sees the switches its forward saw: the quantizer's forward runs under `ieee_fp32`,
    its backward after that context has ended, and a compiled function would otherwise be recompiled for the other
    global state (and recompute with other numerics)."""
    matmul, cudnn = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32

    @contextlib.contextmanager
    def switches():
        saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = matmul, cudnn
        try:
            yield
        finally:
            torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved

    return switches()


def peak_bf16_tflops(device: torch.device | str) -> float | None:
    """The device's dense bf16 peak in TFLOP/s from `PEAK_BF16_TFLOPS`, or None (CPU, unknown GPUs)."""
    device = torch.device(device)
    if device.type != "cuda" or not torch.cuda.is_available():
        return None
    return peak_bf16_tflops_of_name(torch.cuda.get_device_name(device))


def peak_bf16_tflops_of_name(name: str) -> float | None:
    """The dense bf16 peak of a CUDA device name (`torch.cuda.get_device_name`, e.g. "NVIDIA H100 NVL") from
    `PEAK_BF16_TFLOPS`, or None for a name it does not list."""
    return next((tflops for fragment, tflops in PEAK_BF16_TFLOPS if fragment in name), None)


class HostSyncDetector(TorchDispatchMode):
    """Records, while active, every operator of `SYNCING_OPS`, indexing with a boolean mask, and every explicit
    copy to the host: `.cpu()`, `.tolist()`, `.numpy()` (and numpy's `__array__`) always, since on a GPU each is
    a blocking device-to-host copy and a CPU run calls them exactly where a GPU run would; `.to(<cpu>)` and
    `.copy_` into a CPU tensor only from a tensor that is not on the CPU (on CPU `x.to(self.device)` is a no-op).
    `found` counts them by name ("aten.nonzero.default", "aten.index.Tensor (boolean mask)", "Tensor.cpu",
    "Tensor.to (to cpu from cuda)"); `hits` says where each one was called from (the innermost frame outside
    torch and this module). Ops inside a torch.compile'd region are not seen: run it eager."""

    def __init__(self):
        super().__init__()
        self.found: Counter[str] = Counter()
        self.hits: list[str] = []
        self._pulls = _HostPullDetector(self)

    def __enter__(self):
        super().__enter__()
        try:
            self._pulls.__enter__()
        except BaseException:
            super().__exit__(None, None, None)
            raise
        return self

    def __exit__(self, exc_type, exc_value, tb):
        try:
            self._pulls.__exit__(exc_type, exc_value, tb)
        finally:
            super().__exit__(exc_type, exc_value, tb)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = func.overloadpacket.__name__
        if name in SYNCING_OPS:
            self._record(str(func))
        elif name in BOOL_INDEXED_OPS:
            indices = args[1] if len(args) > 1 else kwargs.get("indices", ())
            if any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in indices or ()):
                self._record(f"{func} (boolean mask)")
        return func(*args, **kwargs)

    def _record(self, what: str) -> None:
        self.found[what] += 1
        outside = [f for f in traceback.extract_stack()
                   if f"{os.sep}torch{os.sep}" not in f.filename and f.filename != __file__]
        where = f"{os.path.basename(outside[-1].filename)}:{outside[-1].lineno}: {outside[-1].line}" if outside else "?"
        self.hits.append(f"{what} at {where}")


class _HostPullDetector(TorchFunctionMode):
    """The Python-API half of HostSyncDetector (entered and left with it): the explicit copies to the host."""

    def __init__(self, detector: HostSyncDetector):
        super().__init__()
        self.detector = detector

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        what = HOST_PULLS.get(func)
        if what is None and args and isinstance(args[0], torch.Tensor):
            source = None
            if func is torch.Tensor.to:
                # what nn.Module.to parses too: (device, dtype, non_blocking, memory_format); a tensor argument
                # gives its device
                target = torch._C._nn._parse_to(*args[1:], **kwargs)[0]
                source = args[0].device if target is not None and target.type == "cpu" else None
            elif func is torch.Tensor.copy_:
                src = args[1] if len(args) > 1 else kwargs.get("src")
                source = src.device if args[0].device.type == "cpu" and isinstance(src, torch.Tensor) else None
            if source is not None and source.type != "cpu":
                what = f"Tensor.{func.__name__} (to cpu from {source.type})"
        if what is not None:
            self.detector._record(what)
        return func(*args, **kwargs)


@contextlib.contextmanager
def no_host_sync(device: torch.device | str, detector: bool | None = None):
    """Raise `RuntimeError` if the enclosed code syncs the host: on CUDA at the offending call (torch's sync
    debug mode), and with `detector` at exit (HostSyncDetector, naming each operator and how often it ran).
    `detector=None` runs it off CUDA only: there torch's own check is the real one, and the Python-level
    detector would slow every operator down."""
    device = torch.device(device)
    cuda = device.type == "cuda"
    previous = torch.cuda.get_sync_debug_mode() if cuda else 0
    found = HostSyncDetector() if (not cuda if detector is None else detector) else None
    if cuda:
        torch.cuda.set_sync_debug_mode("error")
    try:
        with found if found is not None else contextlib.nullcontext():
            yield found
    finally:
        if cuda:
            torch.cuda.set_sync_debug_mode(previous)
    if found is not None and found.found:
        raise RuntimeError(f"host syncs inside a no_host_sync block: {dict(found.found)}; first at: "
                           + "; ".join(found.hits[:3]))


__all__ = ["enable_fast_math", "ieee_fp32", "tf32_as_now", "peak_bf16_tflops", "peak_bf16_tflops_of_name",
           "HostSyncDetector", "no_host_sync", "SYNCING_OPS", "BOOL_INDEXED_OPS", "HOST_PULLS", "PEAK_BF16_TFLOPS"]
