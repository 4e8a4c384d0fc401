"""Shared helpers for the Triton kernels: interpreter detection, autotune config shrinking, device guards."""

import contextlib
import os

import torch
import triton

# TRITON_INTERPRET must be set before triton compiles anything; it is read once, here.
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
# FASTCNC_AUTOTUNE=0 keeps only the first valid config of each kernel (its config pruning still applies): correctness
# runs on a GPU then compile once per specialisation instead of benchmarking every config.
AUTOTUNE = os.environ.get("FASTCNC_AUTOTUNE", "1") != "0"
# Autotune keys bucket the row count M (batch * H * W) to a power of two capped here, so a new batch size (or the
# last, smaller batch of an epoch) reuses the tuned config instead of benchmarking every config again.
M_BUCKET_CAP = 1 << 16


def shrink_configs(configs: list[triton.Config]) -> list[triton.Config]:
    """Autotune with >1 config calls do_bench, which needs a GPU driver: keep only the first under the interpreter."""
    return configs[:1] if INTERPRET else configs


def m_bucket(m: int) -> int:
    """The autotune key of a row count: the next power of two, capped at ``M_BUCKET_CAP``."""
    return min(triton.next_power_of_2(max(m, 1)), M_BUCKET_CAP)


def device_guard(t: torch.Tensor):
    """Launch on ``t``'s GPU even when another one is current (triton launches on the current device)."""
    return torch.cuda.device(t.device) if t.device.type == "cuda" else contextlib.nullcontext()


def upload(values: list[int], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A small host table on ``device`` without a host sync: a pageable upload waits for the stream, a pinned
    non-blocking one does not (the caching host allocator keeps the buffer alive until the copy is done)."""
    host = torch.tensor(values, dtype=dtype)
    if device.type == "cuda":
        host = host.pin_memory()
    return host.to(device, non_blocking=True)


_TUNED_CONFIGS: dict[tuple, dict] = {}


def launch_autotuned(kernel, grid, key: tuple, **kwargs) -> None:
    """``kernel[grid](**kwargs)`` for an ``@triton.autotune`` kernel, calling its JIT function directly once the
    autotuner has chosen a config for this argument signature: the autotuner rebuilds its key from every argument on
    each call, tens of microseconds of Python per launch that a training step pays for every layer.

    ``key``: the values of the kernel's autotune key arguments; the dtypes of the tensor arguments are added here, as
    the autotuner adds them to its own key.
    """
    full_key = (id(kernel), key, *(v.dtype for v in kwargs.values() if isinstance(v, torch.Tensor)))
    config = _TUNED_CONFIGS.get(full_key)
    if config is None:
        kernel[grid](**kwargs)
        best = getattr(kernel, "best_config", None)  # unset when a tool intercepts the launch (compile-only tests)
        if best is not None:
            _TUNED_CONFIGS[full_key] = best.all_kwargs()
    else:
        kernel.fn[grid](**kwargs, **config)
