"""Smoke tests of benchmarks/tscnc_step.py (the whole-TSCNC-step benchmark is a CLI, run on a GPU by gpu_session.sh):
its CPU run end to end on ResNet-18, and the per-stream kernel table it adds to a CUDA profile; and of
benchmarks/host_ops.py (the step's host ops on the simulated CUDA path).

Run: pytest benchmarks/bench_tscnc_step.py
"""

import json

from tscnc_step import main, stream_table


def _kernel(stream, ts, dur, name="k"):
    return {"ph": "X", "cat": "kernel", "name": name, "ts": ts, "dur": dur, "args": {"stream": stream}}


def test_stream_table_sums_per_stream_and_measures_the_overlap():
    # two steps; stream 7 busy 0-10 (kernel a) and 20-30 us (b), stream 9 busy 5-15 us (a): the union is 25 us, the
    # sum 30 us
    trace = {"traceEvents": [_kernel(7, 0, 10, "a"), _kernel(9, 5, 10, "a"), _kernel(7, 20, 10, "b"),
                             {"ph": "X", "cat": "cpu_op", "name": "aten::mm", "ts": 0, "dur": 100}]}
    md = stream_table(trace, steps=2)
    assert "sum of kernel time 0.01" in md and "device busy (union over streams) 0.01" in md  # (15 and 12.5 us/step)
    streams, kernels = md.split("Top kernels")
    rows = [line.split(" | ") for line in streams.splitlines() if line.startswith(("| 7 ", "| 9 "))]
    assert [r[0] for r in rows] == ["| 7", "| 9"]  # busiest first
    assert rows[0][1] == "1" and rows[0][2] == "0.01" and rows[0][3] == "0.03 |"
    tops = [line.split(" | ")[:2] for line in kernels.splitlines() if line.startswith(("| 7 ", "| 9 "))]
    assert sorted(tops) == [["| 7", "`a`"], ["| 7", "`b`"], ["| 9", "`a`"]]  # each stream's own kernels
    assert stream_table({"traceEvents": []}, steps=1) == "No kernel events in the trace.\n"


def test_tscnc_step_cli_runs_on_cpu(tmp_path):
    assert main(["--model", "resnet18", "--device", "cpu", "--sparsity", "0", "0.9", "--repeats", "1",
                 "--warmup", "1", "--baseline-repeats", "1", "--out", str(tmp_path)]) == 0
    res = json.loads((tmp_path / "tscnc-step-cpu-resnet18.json").read_text())
    assert [row["sparsity"] for row in res["rows"]] == [0.0, 0.9]
    assert all(row["refreshed_in_timed_calls"] == 0 for row in res["rows"])


def test_host_ops_cli_counts_the_simulated_cuda_step():
    # benchmarks/host_ops.py needs TRITON_INTERPRET=1 before triton is imported: its own process
    import os
    import re
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).with_name("host_ops.py")
    out = subprocess.run([sys.executable, str(script), "--model", "resnet18", "--width", "4", "--top", "3"],
                         env={**os.environ, "TRITON_INTERPRET": "1"}, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    total, fwd, bwd = map(int, re.search(r"(\d+) host ops \(forward (\d+), backward (\d+)\)", out.stdout).groups())
    assert total == fwd + bwd and fwd > 21 and bwd > 21  # (ResNet-18: 21 matrices, at least an op each way)
    without = subprocess.run([sys.executable, str(script)], env={**os.environ, "TRITON_INTERPRET": "0"},
                             capture_output=True, text=True, timeout=60)
    assert without.returncode != 0 and "TRITON_INTERPRET=1" in without.stderr
