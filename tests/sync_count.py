"""Count the host syncs a piece of code would make on CUDA, by running it on CPU tensors (or on CUDA tensors).

A host sync is anything that makes the CPU wait for the GPU's queue to drain. ``HostSyncCounter`` (a
``TorchDispatchMode`` plus a few patched ``torch.Tensor`` methods) records every one of these:

* ``aten._local_scalar_dense``: ``.item()``, ``bool()/int()/float()`` of a tensor, ``if t:``, and a 0-dim tensor
  passed where a Python number is expected (``x.addr_(u, v, alpha=t)``: the argument parser calls ``.item()``);
* ops whose *output shape* depends on the data, so the host must read a count back: ``nonzero``/``argwhere``,
  ``masked_select``, ``unique*``, boolean-mask indexing and ``index_put_`` with a boolean mask (they go through
  nonzero), ``repeat_interleave`` without ``output_size``, ``bincount``; and ops that return a Python bool
  (``equal``, ``allclose``, ``is_nonzero``);
* ops whose CUDA implementation reads an error flag back to the host: ``_linalg_check_errors`` (what
  ``torch.linalg.cholesky/inv/solve`` add on top of their ``*_ex`` forms), any ``*_ex`` op called with
  ``check_errors=True``, ``_linalg_svd`` (``svd``/``svdvals``/``matrix_norm(ord=2)``) and ``_linalg_eigh``
  (``eigh``/``eigvalsh``), whose CUDA kernels check ``info`` on the host, ``linalg_eig`` (computed on the CPU),
  ``linalg_lstsq``; the ``*_ex`` forms with ``check_errors=False`` are not flagged;
* device-to-host copies: ``.cpu()``, ``.tolist()``, ``.numpy()``, ``.to("cpu")`` (the string), ``copy_`` from a
  device tensor into a host tensor;
* host-to-device copies (a pageable upload is synchronous: ``copy_`` waits for the stream): ``torch.tensor(data,
  device=...)`` and a host tensor moved with ``.to(device)``/``.cuda()``/``copy_``, and any op that mixes a device
  tensor with a host tensor of one or more dimensions (the host one is uploaded first, e.g. indexing with a CPU
  index list); 0-dim host tensors are exempt (CUDA ops read them as plain numbers);
* ``torch.cuda.synchronize`` and ``Stream/Event.synchronize``.

On CPU there is no device, so the counter keeps a *host* set: tensors made from Python data (``torch.tensor``,
``as_tensor``, ``from_numpy``), results of ``.cpu()``, and everything computed only from host tensors. All other
tensors count as device tensors (as they would be on the CUDA code path). On CUDA tensors the host set is simply the
CPU tensors. Known blind spots on CPU: a factory called without ``device=`` (``torch.zeros(3)``) is taken as a
device tensor, and ``.to(some_device)`` of a non-host tensor is never flagged (on CPU both sides are the CPU).

Triton launches are opaque: under ``TRITON_INTERPRET=1`` the interpreter copies arguments to numpy and back, which
is not what a compiled launch does, so the counter is paused inside them.

Use ``fastcnc._backend.cuda_code_path()`` to make CPU tensors take the branches CUDA tensors take, and
``count_host_syncs()`` around the code; see ``tests/test_host_syncs.py``.
"""

from __future__ import annotations

import collections
import contextlib
import traceback
import weakref
from dataclasses import dataclass

import torch
from torch.utils._python_dispatch import TorchDispatchMode, _disable_current_modes
from torch.utils._pytree import tree_flatten

aten = torch.ops.aten

# op overload packet -> why it makes the host wait on CUDA
_ALWAYS_SYNC = {
    aten._local_scalar_dense: "reads a device scalar on the host (.item()/bool()/int()/float()/scalar argument)",
    aten.is_nonzero: "bool() of a device tensor",
    aten.nonzero: "output size depends on the data (nonzero)",
    aten.argwhere: "output size depends on the data (argwhere)",
    aten.masked_select: "output size depends on the data (masked_select)",
    aten._unique: "output size depends on the data (unique)",
    aten._unique2: "output size depends on the data (unique)",
    aten.unique_dim: "output size depends on the data (unique)",
    aten.unique_consecutive: "output size depends on the data (unique_consecutive)",
    aten.unique_dim_consecutive: "output size depends on the data (unique_consecutive)",
    aten.bincount: "output size depends on the data (bincount)",
    aten.equal: "returns a Python bool (equal)",
    aten.allclose: "returns a Python bool (allclose)",
    aten._linalg_check_errors: "linalg error check reads info on the host",
    aten._linalg_svd: "CUDA svd checks its info on the host",
    aten._linalg_eigh: "CUDA eigh checks its info on the host",
    aten.linalg_eig: "linalg.eig runs on the CPU",
    aten.linalg_lstsq: "linalg.lstsq checks its info on the host",
}
_CHECK_ERRORS_OPS = {
    aten.linalg_cholesky_ex, aten.linalg_inv_ex, aten._linalg_solve_ex, aten.linalg_lu_factor_ex, aten.linalg_lu,
    aten.linalg_ldl_factor_ex, aten.linalg_solve_ex,
}
_LIFT_OPS = {aten.lift_fresh, aten.lift_fresh_copy, aten.lift}


@dataclass
class HostSync:
    op: str  # the aten op or Python method
    reason: str
    where: str  # the innermost frame outside torch and this module, "file:line in function"

    def __str__(self) -> str:
        return f"{self.op}: {self.reason} at {self.where}"


def _caller() -> str:
    for frame in reversed(traceback.extract_stack()[:-1]):
        f = frame.filename
        if "/torch/" in f or f.endswith("sync_count.py") or "/triton/" in f:
            continue
        return f"{f.rsplit('/', 2)[-2]}/{f.rsplit('/', 1)[-1]}:{frame.lineno} in {frame.name}"
    return "?"


class HostSyncCounter(TorchDispatchMode):
    """Records every op that would make the host wait for the GPU (see the module docstring); ``.syncs`` lists them.

    Args:
        simulate: CPU tensors stand for device tensors (the CUDA code path run on CPU); False on real CUDA tensors.
    """

    def __init__(self, simulate: bool):
        super().__init__()
        self.simulate = simulate
        self.syncs: list[HostSync] = []
        self._host: dict[int, weakref.ref] = {}  # id -> weak reference (tensors compare elementwise: no WeakSet)
        self.paused = 0
        self.launches = 0  # Triton launches seen (under the interpreter): proof that the kernel path ran
        self.ops: collections.Counter[str] = collections.Counter()  # dispatched ops (host work), by name

    # -- host / device bookkeeping
    def is_host(self, t: torch.Tensor) -> bool:
        if t.device.type != "cpu":
            return False
        if not self.simulate:
            return True
        ref = self._host.get(id(t))
        return ref is not None and ref() is t

    def mark_host(self, out) -> None:
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor) and t.device.type == "cpu":
                self._host[id(t)] = weakref.ref(t)

    def mark_device(self, t: torch.Tensor) -> None:
        self._host.pop(id(t), None)

    def record(self, op: str, reason: str) -> None:
        if not self.paused:
            self.syncs.append(HostSync(op, reason, _caller()))

    # -- the dispatch hook
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if self.paused:
            return out
        packet = func.overloadpacket
        self.ops[packet.__name__] += 1
        tensors = [t for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)]
        host = [self.is_host(t) for t in tensors]
        if packet in _LIFT_OPS:  # a tensor made from Python data lives on the host until uploaded
            self.mark_host(out)
            return out
        if tensors and all(host):  # host-only arithmetic never waits for the device
            self.mark_host(out)
            return out
        if packet in _ALWAYS_SYNC:
            self.record(str(func), _ALWAYS_SYNC[packet])
        elif packet in _CHECK_ERRORS_OPS and kwargs.get("check_errors", False):
            self.record(str(func), "check_errors=True reads info on the host")
        elif packet in (aten.index, aten.index_put, aten.index_put_, aten._index_put_impl_) and any(
            isinstance(i, torch.Tensor) and i.dtype in (torch.bool, torch.uint8)
            for i in tree_flatten(args[1] if len(args) > 1 else kwargs.get("indices"))[0]
        ):
            self.record(str(func), "boolean-mask indexing goes through nonzero")
        elif packet is aten.repeat_interleave and kwargs.get("output_size") is None and (
            len(args) < 4 or args[3] is None
        ):
            self.record(str(func), "repeat_interleave without output_size reads the total on the host")
        elif packet is aten.copy_ and len(args) >= 2 and isinstance(args[1], torch.Tensor):
            dst_host, src_host = self.is_host(args[0]), self.is_host(args[1])
            if src_host and not dst_host:
                self.record(str(func), "host-to-device copy (synchronous for pageable memory)")
            elif dst_host and not src_host and not (_non_blocking(args, kwargs) and args[0].is_pinned()):
                # (a non_blocking copy into pinned memory is queued on the stream: the host does not wait)
                self.record(str(func), "device-to-host copy")
        elif any(host) and any(h and t.dim() > 0 for t, h in zip(tensors, host, strict=True)):
            self.record(str(func), "mixes device tensors with a host tensor, which is uploaded first")
        return out


def _non_blocking(args, kwargs) -> bool:
    return bool(kwargs.get("non_blocking", args[2] if len(args) > 2 else False))


_ACTIVE: list[HostSyncCounter] = []


def _active() -> HostSyncCounter | None:
    return _ACTIVE[-1] if _ACTIVE and not _ACTIVE[-1].paused else None


def _has_device_arg(args, kwargs) -> bool:
    if "device" in kwargs or "other" in kwargs:
        return True
    return any(isinstance(a, str | torch.device | torch.Tensor | int) and not isinstance(a, bool) for a in args)


def _patched_methods():
    """Python-level methods that move data without an aten op the dispatch mode can see on CPU."""
    real = {name: getattr(torch.Tensor, name) for name in ("cpu", "tolist", "numpy", "to", "cuda")}

    def cpu(self, *args, **kwargs):
        counter = _active()
        if counter is not None and not counter.is_host(self):
            counter.record("Tensor.cpu", "device-to-host copy")
        out = real["cpu"](self, *args, **kwargs)
        if counter is not None:
            counter.mark_host(out)
        return out

    def tolist(self):
        counter = _active()
        if counter is not None and not counter.is_host(self):
            counter.record("Tensor.tolist", "device-to-host copy")
        return real["tolist"](self)

    def numpy(self, *args, **kwargs):
        counter = _active()
        if counter is not None and not counter.is_host(self):
            counter.record("Tensor.numpy", "device-to-host copy")
        return real["numpy"](self, *args, **kwargs)

    def to(self, *args, **kwargs):
        counter = _active()
        out = real["to"](self, *args, **kwargs)
        if counter is None:
            return out
        target = kwargs.get("device", args[0] if args else None)
        if isinstance(target, str) and target == "cpu":
            if not counter.is_host(self):
                counter.record("Tensor.to('cpu')", "device-to-host copy")
            counter.mark_host(out)
        elif counter.is_host(self) and _has_device_arg(args, kwargs):
            counter.record("Tensor.to(device)", "host-to-device copy (synchronous for pageable memory)")
            if counter.simulate and out.data_ptr() == self.data_ptr():
                # on CPU the "upload" returns the host tensor itself; on CUDA it is a new device tensor: give a copy
                counter.paused += 1
                try:
                    out = out.clone()
                finally:
                    counter.paused -= 1
                counter.mark_device(out)
        elif counter.is_host(self) and out.device.type == "cpu":
            counter.mark_host(out)  # a dtype change of a host tensor stays on the host
        return out

    def cuda(self, *args, **kwargs):
        counter = _active()
        if counter is not None and counter.is_host(self):
            counter.record("Tensor.cuda", "host-to-device copy (synchronous for pageable memory)")
        return real["cuda"](self, *args, **kwargs)

    return real, {"cpu": cpu, "tolist": tolist, "numpy": numpy, "to": to, "cuda": cuda}


def _patched_factories():
    real = {"tensor": torch.tensor, "as_tensor": torch.as_tensor}

    def tensor(data, *args, **kwargs):
        counter = _active()
        out = real["tensor"](data, *args, **kwargs)
        device = kwargs.get("device")
        if counter is not None and device is not None and not (isinstance(device, str) and device == "cpu"):
            if not (isinstance(data, torch.Tensor) and not counter.is_host(data)):
                counter.record("torch.tensor(data, device=...)", "host-to-device upload of Python data")
            counter.mark_device(out)
        return out

    def as_tensor(data, *args, **kwargs):
        counter = _active()
        out = real["as_tensor"](data, *args, **kwargs)
        device = kwargs.get("device")
        if counter is not None and device is not None and not (isinstance(data, torch.Tensor)
                                                               and not counter.is_host(data)):
            if not (isinstance(device, str) and device == "cpu"):
                counter.record("torch.as_tensor(data, device=...)", "host-to-device upload of Python data")
                counter.mark_device(out)
        return out

    return real, {"tensor": tensor, "as_tensor": as_tensor}


def _patched_cuda_sync():
    real = {"synchronize": torch.cuda.synchronize}

    def synchronize(*args, **kwargs):
        counter = _active()
        if counter is not None:
            counter.record("torch.cuda.synchronize", "waits for the device")
        return real["synchronize"](*args, **kwargs)

    return real, {"synchronize": synchronize}


@contextlib.contextmanager
def _paused_in_triton_launches(counter: HostSyncCounter):
    """Triton launches are opaque to the counter (see the module docstring)."""
    patched = []
    try:
        from triton.runtime.interpreter import GridExecutor
    except ImportError:  # pragma: no cover - triton is a test dependency
        GridExecutor = None
    if GridExecutor is not None:
        real_call = GridExecutor.__call__

        def call(self, *args, **kwargs):
            counter.launches += 1
            counter.paused += 1
            try:
                with _disable_current_modes():
                    return real_call(self, *args, **kwargs)
            finally:
                counter.paused -= 1

        GridExecutor.__call__ = call
        patched.append((GridExecutor, "__call__", real_call))
    try:
        yield
    finally:
        for owner, name, value in patched:
            setattr(owner, name, value)


@contextlib.contextmanager
def count_host_syncs(simulate: bool = True):
    """``with count_host_syncs() as counter: ...``; then ``counter.syncs`` lists the host syncs (empty is the goal).

    Args:
        simulate: CPU tensors stand for device tensors (the CUDA code path run on CPU, together with
            ``fastcnc._backend.cuda_code_path()``); pass False when the code runs on real CUDA tensors.
    """
    counter = HostSyncCounter(simulate)
    real_methods, methods = _patched_methods()
    real_factories, factories = _patched_factories()
    real_sync, syncs = _patched_cuda_sync()
    for name, fn in methods.items():
        setattr(torch.Tensor, name, fn)
    for name, fn in factories.items():
        setattr(torch, name, fn)
    torch.cuda.synchronize = syncs["synchronize"]
    _ACTIVE.append(counter)
    try:
        with _paused_in_triton_launches(counter), counter:
            yield counter
    finally:
        _ACTIVE.pop()
        for name, fn in real_methods.items():
            setattr(torch.Tensor, name, fn)
        for name, fn in real_factories.items():
            setattr(torch, name, fn)
        torch.cuda.synchronize = real_sync["synchronize"]


def format_syncs(syncs: list[HostSync]) -> str:
    return "\n".join(f"  {s}" for s in syncs) or "  (none)"


class ReplayNothing:
    """Stand-in for torch.cuda.CUDAGraph: capture runs the call once; a replay dispatches no op (a real replay is one
    host call whose kernels are device work; the estimate stays the captured one, enough to count the host's ops
    around it)."""

    def capture(self, fn, warmup):
        warmup()
        return fn()

    def replay(self):
        pass


def replay_engine_on_cpu(reg) -> None:
    """Make ``reg`` (a ``fastcnc.TSCNC`` on CPU tensors, inside ``cuda_code_path()``) replay its engine as a CUDA
    step does, from a ``ReplayNothing`` graph."""
    from fastcnc.graphed import GraphedEngine

    o = reg.options
    reg._graphed = GraphedEngine(dict(rtol=o.rtol, floor=o.floor, block=o.block, iters=o.iters,
                                      max_rounds=o.max_rounds), graph_factory=ReplayNothing)
    reg._use_graph = lambda mats: True
