"""Shared helpers for the Triton kernels: interpreter detection and autotune config shrinking."""

import os

import triton

# TRITON_INTERPRET must be set before triton compiles anything; it is read once, here.
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"


def shrink_configs(configs: list[triton.Config]) -> list[triton.Config]:
    """Autotune with >1 config calls do_bench, which needs a GPU driver: keep only the first under the interpreter."""
    return configs[:1] if INTERPRET else configs
