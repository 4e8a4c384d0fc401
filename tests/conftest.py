import os

import torch

# The kernels must be able to run on CPU tensors in tests: TRITON_INTERPRET has to be set before triton is imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

from fastcnc import _backend  # noqa: E402

BACKENDS = ["torch", pytest.param("triton", marks=pytest.mark.interpret)]


def pytest_collection_modifyitems(config, items):
    """On a GPU machine (no interpreter) the `interpret` tests that feed CPU tensors to the kernels cannot run: skip
    them with a reason. Those taking the ``kernel_device`` fixture run on the GPU instead."""
    if _backend.INTERPRET:
        return
    skip = pytest.mark.skip(reason="CPU-tensor kernel test: needs TRITON_INTERPRET=1 (run with CUDA_VISIBLE_DEVICES=)")
    for item in items:
        if "interpret" in item.keywords and "kernel_device" not in getattr(item, "fixturenames", ()):
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _seed_and_reset_backend():
    torch.manual_seed(0)
    yield
    _backend.force_backend(None)


@pytest.fixture(params=BACKENDS)
def backend(request):
    """Run a test once on the pure-torch path and once on the Triton kernels (interpreter on CPU)."""
    if request.param == "triton" and not _backend.INTERPRET:
        # these tests feed CPU tensors to the kernels; on a GPU machine the `cuda` tests cover the compiled kernels
        pytest.skip("CPU-tensor kernel test: run with CUDA_VISIBLE_DEVICES= so the interpreter is used")
    _backend.force_backend(request.param)
    yield request.param
    _backend.force_backend(None)


@pytest.fixture
def kernel_device():
    """Where the Triton kernels run in tests: the GPU when there is one, else the CPU under TRITON_INTERPRET=1."""
    return "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture
def one_intra_op_thread():
    """Tests of many small ops: with other processes on a 2-core runner, OpenMP spin-waiting made them 10-50x slower
    with 2 threads (measured), while 1 thread keeps them at seconds."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
