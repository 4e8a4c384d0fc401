"""pytest-benchmark: TSC (transformed-L1) penalty value + gradient over the ResNet-18 weight set.

Run: pytest benchmarks/bench_tsc.py --benchmark-enable [--benchmark-json out.json]
(`--benchmark-disable` runs each target once: a smoke test.) Group ``tsc-penalty-resnet18-<dtype>`` compares:
  fastcnc          ``fastcnc.tsc_penalty`` (CUDA: one batched Triton launch per pass; CPU: its pure-torch path)
  naive-autograd   the formula written per layer in torch, differentiated by autograd
"""

import pytest
import torch
from common import device_name

from fastcnc import tsc_penalty
from fastcnc.models import build_model

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
A = 100.0
DTYPES = [torch.float32] + ([torch.bfloat16] if DEVICE == "cuda" else [])


def naive_tsc(weights: list[torch.Tensor], a: float) -> torch.Tensor:
    return sum(((a + 1) * w.float().abs() / (a + w.float().abs())).sum() for w in weights)


IMPLS = {
    "fastcnc": lambda ws: tsc_penalty(ws, a=A, check_finite=False),
    "naive-autograd": lambda ws: naive_tsc(ws, A),
}


@pytest.fixture(scope="module", params=DTYPES, ids=lambda d: str(d).removeprefix("torch."))
def resnet18_weights(request):
    torch.manual_seed(0)
    model = build_model("resnet18", num_classes=10)
    # conv and linear weights: the tensors a pruned network's sparsity penalty is applied to
    return [p.detach().to(DEVICE, request.param).requires_grad_() for p in model.parameters() if p.dim() > 1]


@pytest.mark.parametrize("impl", list(IMPLS))
def test_tsc_penalty_value_and_grad(benchmark, impl, resnet18_weights):
    weights = resnet18_weights
    fn = IMPLS[impl]

    def step():
        value = fn(weights)
        grads = torch.autograd.grad(value, weights)
        if DEVICE == "cuda":
            torch.cuda.synchronize()
        return value, grads

    # never time a wrong answer: value and gradients must match a float64 evaluation
    value, grads = step()
    ref_leaves = [w.detach().double().requires_grad_() for w in weights]
    ref = sum(((A + 1) * w.abs() / (A + w.abs())).sum() for w in ref_leaves)
    ref_grads = torch.autograd.grad(ref, ref_leaves)
    assert abs(value.item() - ref.item()) <= 1e-5 * ref.item()
    tol = 1e-5 if weights[0].dtype == torch.float32 else 1e-2
    for g, rg in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(g.double(), rg, rtol=tol, atol=tol * 1e-3)

    n_weights = sum(w.numel() for w in weights)
    benchmark.group = f"tsc-penalty-resnet18-{str(weights[0].dtype).removeprefix('torch.')}"
    benchmark.extra_info.update(
        impl=impl, device=device_name(DEVICE), torch=torch.__version__, layers=len(weights), weights=n_weights,
        kernel_path=impl == "fastcnc" and DEVICE == "cuda",  # the dispatch rule: CUDA tensors take the kernels
    )
    benchmark.pedantic(step, rounds=20, warmup_rounds=2)
