"""pytest-benchmark micro-benchmarks of the "cpu" engine (run: pytest bench --benchmark-only).

Medium shapes (4,096 × 4,096, d = 64) so a run takes seconds; bench_cpu_engine.py does full size.
"""
import pytest
import torch

from attnrules import engine
from attnrules.engine import cpu_backend

pytestmark = pytest.mark.skipif(not cpu_backend.is_available(), reason="attnrules._C was not built")
N, D, N_EX = 4096, 64, 100


@pytest.fixture(scope="module")
def data():
    g = torch.Generator().manual_seed(0)
    return dict(q=torch.randn(N, D, generator=g), k=torch.randn(N, D, generator=g), w=torch.randn(N, generator=g),
                qa=torch.rand(N, N_EX, generator=g), ka=torch.randn(N, N_EX, generator=g))  # fmt: skip


@pytest.mark.parametrize("by,k", [("global", 10_000), ("key", 100), ("query", 100)])
@pytest.mark.parametrize("threads", [1, None])
def test_pair_topk(benchmark, data, by, k, threads):
    benchmark.extra_info["gflop"] = 2 * N * N * D / 1e9
    benchmark(engine.pair_topk, data["q"], data["k"], k, by=by, key_weight=data["w"], backend="cpu", threads=threads)


@pytest.mark.parametrize("isa", cpu_backend.supported_isas())
def test_pair_topk_isa(benchmark, data, isa):
    benchmark(engine.pair_topk, data["q"], data["k"], 10_000, key_weight=data["w"], backend="cpu", isa=isa)


def test_dual_topk(benchmark, data):
    benchmark.extra_info["gflop"] = 2 * N * N * (D + N_EX) / 1e9
    benchmark(engine.dual_topk, data["q"], data["k"], data["qa"], data["ka"], 10_000, backend="cpu")


def test_torch_matmul_topk_baseline(benchmark, data):
    benchmark(lambda: torch.topk(((data["q"] @ data["k"].T) * data["w"]).view(-1), 10_000))
