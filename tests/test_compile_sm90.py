"""Compile every Triton kernel of the project for Hopper (sm_90, H100/H200) on a machine without a GPU.

The interpreter tests (TRITON_INTERPRET=1) run the kernels' Python bodies on numpy, so they never meet the real
compiler: a kernel can pass them and still fail to compile (see ``test_interpreter_misses_what_the_compiler_rejects``).
This module runs the real pipeline ``source -> ttir -> ttgir -> llir -> ptx -> cubin`` with
``triton.compile(ASTSource(...), target=GPUTarget("cuda", 90, 32))``. No GPU or driver is involved: the target is
given explicitly and the last step runs the ptxas bundled with triton (``backends/nvidia/bin/ptxas-blackwell``, CUDA
13.4, which triton 3.9 uses for every arch), a host tool. So on a CPU-only machine the check goes all the way to a
Hopper cubin (an ELF image) and only stops short of loading it onto a device. With TRITON_DUMP_PTXAS_LOG=1 the worker
also records registers and spill bytes per specialisation (``python tests/test_compile_sm90.py --report``).

Two kinds of cases:

* ``LaunchCase``: a function that calls the real launchers on small CPU tensors. In the worker every
  ``kernel[grid](...)`` is intercepted: the arguments go through triton's own binder and ``_pack_args`` (the exact
  signature, constexprs and 16-byte-alignment attributes a GPU launch would compile), the kernel is compiled for
  sm_90 instead of launched, and an ``@triton.autotune`` kernel is compiled once per config. This keeps the check
  in step with the launchers (argument types, constexprs, every autotune config) without restating them here.
* ``CompileCase``: an explicit ``(kernel, signature, constexprs, options)``, for a kernel without a launcher yet.

Why a subprocess: ``tests/conftest.py`` sets TRITON_INTERPRET=1 before triton is imported, and in that mode
``@triton.jit`` returns ``InterpretedFunction`` objects, which ``triton.compile`` rejects (no ``cache_key``).
Rewrapping ``kernel.fn`` in a ``JITFunction`` fails too as soon as a kernel calls another ``@triton.jit`` helper
(those are InterpretedFunctions as well), and the launchers' autotune lists are shrunk to one config under the
interpreter. So worker processes (two, cases balanced by ``weight``), started with TRITON_INTERPRET unset and a
fresh TRITON_CACHE_DIR (a cache hit would skip the compile), run the cases and report per case as JSON. The default
tier takes ~20-40 s on 2 cores; ``-m slow`` adds every autotune config of every masked-matmul variant (~5 min).

To add a kernel: append a ``LaunchCase`` (or a ``CompileCase``) to ``CASES``.
``test_every_kernel_has_a_compile_case`` fails until every ``@triton.jit`` function under ``kernels/`` is compiled by
some case.
"""

from __future__ import annotations

import ast
import contextlib
import functools
import importlib
import io
import json
import os
import re
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest

triton = pytest.importorskip("triton")
tl = triton.language

KERNELS_DIR = Path(__file__).resolve().parents[1] / "kernels"
STAGES = ["ttir", "ttgir", "llir", "ptx", "cubin"]
# Hopper's per-block shared memory limit (227 KiB opt-in): a config needing more compiles but cannot launch.
SM90_MAX_SHARED_BYTES = 232448


@dataclass
class LaunchCase:
    id: str
    launch: Callable[[], None]  # calls launchers on small CPU tensors; each launch is compiled for sm_90 instead
    every_config: bool = True  # compile every config of an autotuned kernel (False: its first config only)
    slow: bool = False  # run only with -m slow (a separate worker, outside the default suite's budget)
    weight: float = 1.0  # rough relative compile time, to balance the cases over the worker processes
    int64_offsets: bool = False  # every tensor of pointer offsets must be int64 (index x stride can pass 2**31)
    no_tf32: bool = True  # the PTX must not contain TF32 (the case compiles IEEE-precision products only)


@dataclass
class CompileCase:
    id: str
    kernel: str  # "module:attribute"; autotune/heuristics wrappers are unwrapped to the JITFunction
    signature: dict[str, str]  # runtime arguments -> triton type ("*fp32", "*bf16", "*i64", "i32", "fp32", ...)
    constexprs: dict[str, object] = field(default_factory=dict)  # need not be repeated in the signature
    options: dict[str, object] = field(default_factory=dict)  # num_warps, num_stages, ...
    # Pointer arguments the JIT would tag 16-byte divisible; torch allocations always are, so by default all of them
    # (as at a real launch). The tag is what lets the compiler vectorise, so the PTX checked here is the real one.
    aligned: tuple[str, ...] | None = None
    slow: bool = False
    weight: float = 0.2
    int64_offsets: bool = False
    no_tf32: bool = True


# -- launch cases: small CPU inputs through the real launchers --------------------------------------------------------


def _launch_tsc():
    import torch
    from fastcnc.kernels import tsc

    for dtype in (torch.float32, torch.bfloat16, torch.float16, torch.float64):
        weights = [torch.randn(3, 5).to(dtype), torch.randn(70).to(dtype)]
        scale = torch.ones(2, dtype=torch.float64 if dtype == torch.float64 else torch.float32)
        tsc.tsc_value_grad(weights, 100.0)  # forward: value only
        tsc.tsc_value_grad(weights, 100.0, scale, compute_value=False)  # backward: gradient only
        tsc.tsc_value_grad(weights, 100.0, scale)  # fused value + gradient


def _launch_ritz():
    import torch
    from fastcnc.kernels import ritz

    for r in (1, 2, 4, 6, 8):  # every register-tile width the engine can launch (R = 1, 2, 4, 8)
        ritz.cholesky_qr(torch.randn(3, 40, r, dtype=torch.float64), passes=1)
        ritz.bottom_eigvec(torch.eye(r, dtype=torch.float64).expand(3, r, r).contiguous())


def _launch_bilinear():
    import torch
    from fastcnc.kernels import bilinear

    layout, vectors = [([0], [True], (1, 13, 2), (1, 9, 2))], torch.randn(44, dtype=torch.float64)
    for dtype in (torch.float32, torch.bfloat16, torch.float16, torch.float64):
        bilinear.rank2_grads(layout, vectors, torch.ones(1, 2, dtype=torch.float64), [(9, 13)], dtype)
        # added in place to another gradient (TSCNC's fused backward)
        bilinear.rank2_grads(layout, vectors, torch.ones(1, 2, dtype=torch.float64), [(9, 13)], dtype,
                             add_to=(torch.zeros(9 * 13 + 5, dtype=dtype), [3]))


def _launch_masked_matmul(dtype: str, block: int, precision: str, has_bias: bool, products: str):
    import torch
    from fastcnc.kernels import masked_matmul

    from fastcnc.masked import build_tile_table

    dtype = getattr(torch, dtype)
    groups, n, k, b, rows_l = 2, 40, 24, 2, 5
    weight = torch.randn(groups * n, k).to(dtype)
    tiles = build_tile_table((torch.rand(groups, n, k) < 0.5).to(dtype), block)
    a = torch.randn(b, groups * k, rows_l).to(dtype)
    bias = torch.randn(groups * n).to(dtype) if has_bias else None
    out = torch.empty(b, groups * n, rows_l, dtype=dtype)
    real_precision = masked_matmul._precision
    masked_matmul._precision = lambda t: precision  # the launcher picks "tf32" only for CUDA tensors
    try:
        if "fwd" in products:
            masked_matmul.masked_mm_fwd(a, weight, tiles.keep, tiles.k_idx, tiles.k_cnt, bias, out, groups=groups,
                                        block=block)
        if "dx" in products:
            masked_matmul.masked_mm_bwd_dx(out, weight, tiles.keep, tiles.n_idx, tiles.n_cnt, torch.empty_like(a),
                                           groups=groups, block=block)
        if "dw" in products:
            masked_matmul.masked_mm_bwd_dw(out, a, tiles.keep, tiles.nonzero, torch.empty_like(weight),
                                           groups=groups, block=block)
    finally:
        masked_matmul._precision = real_precision


def _masked_case(dtype: str, block: int, precision: str, has_bias: bool, products: str = "fwd+dx+dw",
                 every_config: bool = False, slow: bool = False) -> LaunchCase:
    return LaunchCase(
        f"masked_matmul-{dtype}-tile{block}-{precision}{'-bias' if has_bias else ''}-{products}"
        f"{'-all_configs' if every_config else ''}",
        functools.partial(_launch_masked_matmul, dtype, block, precision, has_bias, products),
        every_config=every_config, slow=slow, weight=(5.0 if every_config else 1.0) * (products.count("+") + 1),
        int64_offsets=True, no_tf32=precision != "tf32",
    )


# Default tier: every kernel on every dtype path (first autotune config that survives the pruning), plus every
# config of the product with the largest shared memory (dW, fp32, 64x64 tiles). fp32 "ieee" products run on FMAs,
# not tensor cores, and are the slowest to compile (~1-5 s each), hence the split. The slow tier compiles the whole
# dtype x tile x bias x product x config product (~6 min on 2 cores). Every tier fails on a register spill.
MASKED_DEFAULT = [
    _masked_case("float32", 64, "ieee", True),
    _masked_case("float32", 64, "ieee", True, "dw", every_config=True),
    _masked_case("float32", 32, "tf32", False),
    _masked_case("bfloat16", 32, "ieee", True),
    _masked_case("float16", 16, "ieee", False),
]
MASKED_SLOW = [
    _masked_case(dt, blk, prec, bias, products, every_config=True, slow=True)
    for dt, prec in (("float32", "ieee"), ("float32", "tf32"), ("bfloat16", "ieee"), ("float16", "ieee"))
    for blk in (16, 32, 64) for bias in (False, True) for products in ("fwd", "dx", "dw")
    if (dt, blk, prec, bias, products) != ("float32", 64, "ieee", True, "dw")
]

CASES: list[LaunchCase | CompileCase] = [
    LaunchCase("tsc", _launch_tsc, weight=2.0),
    LaunchCase("ritz", _launch_ritz, weight=2.0, int64_offsets=True),
    LaunchCase("bilinear", _launch_bilinear, int64_offsets=True),
    *MASKED_DEFAULT,
    *MASKED_SLOW,
    # the explicit form, kept exercised on a kernel that compiles (the broken case below must fail for the right reason)
    CompileCase(
        id="tsc_layer_sum-explicit",
        kernel="fastcnc.kernels.tsc:_tsc_layer_sum_kernel",
        signature={"meta_ptr": "*i64", "partial_ptr": "*fp32", "value_ptr": "*fp32", "n_layers": "i32"},
        constexprs={"BLOCK_R": 1024, "ACC_DTYPE": tl.float32},
        options={"num_warps": 4},
    ),
]

# JITFunction.run copies these knobs into the compile options when the installed triton has them (3.9 added
# fpsan_homomorphic_casts; 3.6 has only instrumentation_mode).
_RUN_KNOBS = ("instrumentation_mode", "fpsan_homomorphic_casts")
_INT32_TENSOR_ADDPTR = re.compile(r"tt\.addptr [^\n]*: tensor<[^\n]*!tt\.ptr<[^\n]*>>, tensor<[0-9x]*xi32>")
_TF32_PTX = re.compile(r"tf32")

# @triton.jit functions that are not launched on their own (device helpers) and are compiled through their callers.
COMPILED_THROUGH_CALLERS: dict[str, str] = {
    "fastcnc.kernels.ritz:_inverse_cholesky_factor": "ritz",
}


# -- deliberately broken kernel: proves a compile error in a case turns into a test failure ----------------------------


def _plain_python_double(x):
    return x * 2.0


@triton.jit
def _calls_plain_python_kernel(x_ptr, y_ptr, n, BLOCK: tl.constexpr):
    # calling a non-@triton.jit function is fine for the interpreter and a compile error for the real compiler
    offs = tl.arange(0, BLOCK)
    mask = offs < n
    tl.store(y_ptr + offs, _plain_python_double(tl.load(x_ptr + offs, mask=mask)), mask=mask)


BROKEN_CASE = CompileCase(
    id="broken-calls-plain-python",
    kernel="__main__:_calls_plain_python_kernel",
    signature={"x_ptr": "*fp32", "y_ptr": "*fp32", "n": "i32"},
    constexprs={"BLOCK": 128},
)

ALL_CASES = {case.id: case for case in [*CASES, BROKEN_CASE]}


# -- worker (runs in a subprocess without TRITON_INTERPRET) ------------------------------------------------------------


def _sm90():
    from triton.backends.compiler import GPUTarget

    return GPUTarget("cuda", 90, 32)


def _compile_record(fn, signature: dict, constexprs: dict, attrs: dict, options: dict) -> dict:
    """Compile one specialisation for sm_90; never raises, so one broken kernel cannot hide the others."""
    named = {fn.arg_names[k[0]] if isinstance(k, tuple) else k: v for k, v in constexprs.items()}
    pointer_types = sorted({t for t in signature.values() if t.startswith("*")})
    variant = ([f"pointers={'/'.join(pointer_types)}"] + [f"{k}={v}" for k, v in named.items()]
               + [f"{k}={options.get(k)}" for k in ("num_warps", "num_stages")])
    record = {"kernel": f"{fn.fn.__module__}:{fn.__name__}", "variant": ", ".join(variant)}
    start = time.perf_counter()
    ptxas_log = io.StringIO()
    try:
        source = triton.compiler.ASTSource(fn=fn, signature=signature, constexprs=constexprs, attrs=attrs)
        with contextlib.redirect_stdout(ptxas_log):  # TRITON_DUMP_PTXAS_LOG=1 prints `ptxas -v` here
            compiled = triton.compile(source, target=_sm90(), options=options)
    except Exception as err:
        return {**record, "ok": False, "error": f"{type(err).__name__}: {err}"[-3000:]}
    asm = compiled.asm
    ptx = asm.get("ptx", "")
    registers = re.search(r"Used (\d+) registers", ptxas_log.getvalue())
    spills = re.search(r"(\d+) bytes spill stores", ptxas_log.getvalue())
    stack = re.search(r"(\d+) bytes stack frame", ptxas_log.getvalue())
    return {
        **record,
        "ok": True,
        "seconds": round(time.perf_counter() - start, 3),
        "stages": [s for s in STAGES if s in asm and len(asm[s]) > 0],
        "ptx_target": next((ln.split()[1] for ln in ptx.splitlines() if ln.startswith(".target")), None),
        "cubin_is_elf": bytes(asm.get("cubin", b""))[:4] == b"\x7fELF",
        "shared_bytes": compiled.metadata.shared,
        "registers": int(registers.group(1)) if registers else None,  # per thread, from ptxas -v
        "spill_store_bytes": int(spills.group(1)) if spills else None,
        "stack_bytes": int(stack.group(1)) if stack else None,
        # pointer arithmetic on whole tiles with 32-bit offsets: wraps once index x stride passes 2**31
        "int32_tensor_offsets": _INT32_TENSOR_ADDPTR.findall(asm.get("ttir", "")),
        "tf32": bool(_TF32_PTX.search(ptx)),
        "num_warps": compiled.metadata.num_warps,
        "expected_num_warps": options.get("num_warps", 4),
    }


class _Interceptor:
    """Makes every ``kernel[grid](...)`` compile for sm_90 instead of launching, recording one result per distinct
    specialisation; an autotuned kernel is compiled for every config (or its first, see ``LaunchCase.every_config``).

    Mirrors ``JITFunction.run`` of triton 3.9 up to ``_do_compile``: same binder, same ``_pack_args``, same options.
    """

    def __init__(self):
        from triton.compiler import make_backend
        from triton.runtime.autotuner import Autotuner
        from triton.runtime.jit import JITFunction, create_function_from_signature

        self.records: list[dict] = []
        self.seen: set = set()
        self.every_config = True
        interceptor = self

        def compile_instead_of_launch(fn, *args, grid, warmup, **kwargs):
            kwargs["debug"] = kwargs.get("debug", fn.debug) or triton.knobs.runtime.debug
            # the compile options JITFunction.run adds from the knobs; the set differs between triton versions
            for knob in _RUN_KNOBS:
                if hasattr(triton.knobs.compilation, knob):
                    kwargs[knob] = getattr(triton.knobs.compilation, knob)
            backend = make_backend(_sm90())
            binder = create_function_from_signature(fn.signature, fn.params, backend)
            bound_args, specialization, options = binder(*args, **kwargs)
            options, signature, constexprs, attrs = fn._pack_args(backend, kwargs, bound_args, specialization, options)
            key = (fn.fn.__module__, fn.__name__, str(signature), str(constexprs), str(attrs), str(options))
            if key in interceptor.seen:
                return None
            interceptor.seen.add(key)
            record = _compile_record(fn, signature, constexprs, attrs, options.__dict__)
            if record["ok"] and callable(grid):  # the launcher's grid function must evaluate as at a real launch
                try:
                    record["grid"] = list(grid(bound_args))
                except Exception as err:
                    record.update(ok=False, error=f"grid: {type(err).__name__}: {err}")
            interceptor.records.append(record)
            return None

        def run_configs(autotuner, *args, **kwargs):
            # the configs the autotuner would benchmark for these arguments, after its early_config_prune
            autotuner.nargs = dict(zip(autotuner.arg_names, args, strict=False))  # args may be fewer
            configs = autotuner.prune_configs(kwargs)
            autotuner.nargs = None
            for config in configs if interceptor.every_config else configs[:1]:
                autotuner.fn.run(*args, **kwargs, **config.all_kwargs())

        JITFunction.run = compile_instead_of_launch
        Autotuner.run = run_configs

    def run_case(self, case: LaunchCase | CompileCase) -> dict:
        self.records, self.seen = [], set()
        try:
            if isinstance(case, LaunchCase):
                self.every_config = case.every_config
                case.launch()
            else:
                fn = _resolve_kernel(case.kernel)
                signature = {n: "constexpr" if n in case.constexprs else case.signature[n] for n in fn.arg_names}
                aligned = case.aligned if case.aligned is not None else [
                    n for n, t in case.signature.items() if t.startswith("*")]
                attrs = {(fn.arg_names.index(n),): [["tt.divisibility", 16]] for n in aligned}
                self.records.append(_compile_record(fn, signature, case.constexprs, attrs, dict(case.options)))
        except Exception as err:
            return {"compiles": self.records, "error": f"{type(err).__name__}: {err}"[-3000:]}
        return {"compiles": self.records, "error": None}


def _resolve_kernel(spec: str):
    from triton.runtime.jit import JITFunction

    module_name, attr = spec.split(":")
    module = sys.modules["__main__"] if module_name == "__main__" else importlib.import_module(module_name)
    fn = getattr(module, attr)
    while not isinstance(fn, JITFunction):  # Autotuner / Heuristics keep the wrapped function in .fn
        fn = fn.fn
    return fn


def _worker(case_ids: list[str]) -> None:
    interceptor = _Interceptor()
    print("RESULTS" + json.dumps({case_id: interceptor.run_case(ALL_CASES[case_id]) for case_id in case_ids}))


def _compile_in_workers(case_ids: list[str], cache_dir: Path, n_workers: int = 2) -> dict:
    """Run the cases in ``n_workers`` fresh processes (round robin) without TRITON_INTERPRET; merge their results."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(cache_dir)  # fresh: a cache hit would skip the compile under test
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # the current default, stated to silence triton's notice
    env["TRITON_DUMP_PTXAS_LOG"] = "1"  # register and spill counts for the report
    env["TRITON_ALWAYS_COMPILE"] = "1"  # a specialisation shared by two cases must run ptxas (and report) in both
    chunks: list[list[str]] = [[] for _ in range(n_workers)]
    loads = [0.0] * n_workers
    for case_id in sorted(case_ids, key=lambda c: -ALL_CASES[c].weight):  # heaviest first onto the lightest worker
        i = loads.index(min(loads))
        chunks[i].append(case_id)
        loads[i] += ALL_CASES[case_id].weight
    chunks = [chunk for chunk in chunks if chunk]
    procs = [subprocess.Popen([sys.executable, __file__, *chunk], env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, cwd=Path(__file__).resolve().parents[1])
             for chunk in chunks]
    results = {}
    for proc in procs:
        stdout, stderr = proc.communicate(timeout=600)
        lines = [ln for ln in stdout.splitlines() if ln.startswith("RESULTS")]
        assert proc.returncode == 0 and lines, f"compile worker failed (rc={proc.returncode}):\n{stderr[-4000:]}"
        results.update(json.loads(lines[-1][len("RESULTS"):]))
    return results


@pytest.fixture(scope="module")
def compile_results(request, tmp_path_factory) -> dict:
    """Results of the default-tier cases the session selected (all of them for the coverage test), compiled once."""
    default = [case.id for case in CASES if not case.slow]
    selected = [item for item in request.session.items if item.module is request.module]
    wanted = {getattr(item, "callspec", None) and item.callspec.params.get("case_id") for item in selected}
    wanted &= set(default)
    names = {item.originalname for item in selected}
    if "test_every_kernel_has_a_compile_case" in names:
        wanted |= set(default)
    if "test_compile_check_rejects_a_broken_kernel" in names:
        wanted.add(BROKEN_CASE.id)
    case_ids = [case_id for case_id in ALL_CASES if case_id in wanted]
    return _compile_in_workers(case_ids, tmp_path_factory.mktemp("triton_cache"), n_workers=min(2, os.cpu_count() or 1))


# -- tests -------------------------------------------------------------------------------------------------------------


def _check_result(case_id: str, result: dict) -> None:
    case = ALL_CASES[case_id]
    assert result["error"] is None, f"{case_id}: {result['error']}"
    assert result["compiles"], f"{case_id} compiled nothing"
    failed = [f"{r['kernel']} [{r['variant']}]:\n{r['error']}" for r in result["compiles"] if not r["ok"]]
    assert not failed, f"{len(failed)} of {len(result['compiles'])} specialisations do not compile for sm_90:\n" + (
        "\n".join(failed))
    for r in result["compiles"]:
        where = f"{r['kernel']} [{r['variant']}]"
        assert r["stages"] == STAGES, f"{where}: missing stages {sorted(set(STAGES) - set(r['stages']))}"
        assert r["ptx_target"] in ("sm_90", "sm_90a"), where
        assert r["cubin_is_elf"], where
        assert r["shared_bytes"] <= SM90_MAX_SHARED_BYTES, f"{where}: {r['shared_bytes']} B of shared memory"
        assert r["num_warps"] == r["expected_num_warps"], where
        # spilled registers go to local memory (L1/L2 traffic on every access): no shipped configuration may spill
        assert r["registers"] is not None and r["spill_store_bytes"] is not None, f"{where}: no ptxas -v report"
        assert r["spill_store_bytes"] == 0, (f"{where}: {r['spill_store_bytes']} B spill stores "
                                             f"({r['registers']} registers, {r['stack_bytes']} B stack)")
        if case.int64_offsets:
            assert not r["int32_tensor_offsets"], f"{where}: int32 tile offsets: {r['int32_tensor_offsets'][:3]}"
        if case.no_tf32:
            assert not r["tf32"], f"{where}: the PTX uses TF32 where IEEE fp32 products were asked for"


@pytest.mark.parametrize("case_id", [case.id for case in CASES if not case.slow])
def test_kernel_compiles_for_sm90(compile_results, case_id):
    _check_result(case_id, compile_results[case_id])


@pytest.mark.slow
@pytest.mark.parametrize("case_id", [case.id for case in CASES if case.slow])
def test_kernel_compiles_for_sm90_exhaustive(tmp_path, case_id):
    _check_result(case_id, _compile_in_workers([case_id], tmp_path, n_workers=1)[case_id])


def test_compile_check_rejects_a_broken_kernel(compile_results):
    result = compile_results[BROKEN_CASE.id]
    assert result["error"] is None and len(result["compiles"]) == 1
    record = result["compiles"][0]
    assert not record["ok"], "a kernel calling a plain Python function must not compile"
    assert "_plain_python_double" in record["error"]


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="only meaningful under the interpreter")
def test_interpreter_misses_what_the_compiler_rejects():
    torch = pytest.importorskip("torch")
    x = torch.arange(5, dtype=torch.float32)
    y = torch.empty_like(x)
    _calls_plain_python_kernel[(1,)](x, y, 5, BLOCK=8)
    torch.testing.assert_close(y, 2 * x)


def _jit_functions(path: Path) -> list[str]:
    """Names of the functions in ``path`` decorated with triton.jit (directly or under autotune/heuristics)."""
    names = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.FunctionDef):
            for dec in node.decorator_list:
                target = dec.func if isinstance(dec, ast.Call) else dec
                if isinstance(target, ast.Attribute) and target.attr == "jit":
                    names.append(node.name)
    return names


def test_every_kernel_has_a_compile_case(compile_results):
    compiled = {r["kernel"] for case in CASES if not case.slow for r in compile_results[case.id]["compiles"] if r["ok"]}
    covered = compiled | set(COMPILED_THROUGH_CALLERS)
    kernels = [f"fastcnc.kernels.{p.stem}:{n}" for p in sorted(KERNELS_DIR.glob("*.py")) for n in _jit_functions(p)]
    assert kernels, f"no @triton.jit function found under {KERNELS_DIR}"
    missing = [k for k in kernels if k not in covered]
    assert not missing, f"add a CompileCase to tests/test_compile_sm90.py for: {missing}"


def _report(case_ids: list[str]) -> None:
    """``python tests/test_compile_sm90.py --report [case ids]``: a markdown table of every compiled specialisation
    (registers, spills, shared memory) for tuning without a GPU; default: every non-slow case."""
    import tempfile

    case_ids = case_ids or [case.id for case in CASES if not case.slow]
    with tempfile.TemporaryDirectory() as cache_dir:
        results = _compile_in_workers(case_ids, Path(cache_dir))
    print("| case | kernel | variant | ok | registers | spill stores (B) | shared (B) | compile (s) |")
    print("|---|---|---|---|---|---|---|---|")
    for case_id in case_ids:
        for r in results[case_id]["compiles"]:
            print(f"| {case_id} | {r['kernel'].split(':')[1]} | {r['variant']} | {r['ok']} | {r.get('registers')} | "
                  f"{r.get('spill_store_bytes')} | {r.get('shared_bytes')} | {r.get('seconds')} |")


if __name__ == "__main__":
    if sys.argv[1:2] == ["--report"]:
        _report(sys.argv[2:])
    else:
        _worker(sys.argv[1:])
