"""The CUDA path: CUDA tensors by device pointer on PyTorch's stream, and the hook with CUDA
buckets on NCCL (1 process: one GPU) and on gloo (2 processes sharing the GPU), all-gathered
and through the reductions of docs/SPEC.md §12, against the CPU simulation bit for bit. Skipped without a GPU or without a `cuda` build of the wheel;
staged for the GPU machine by scripts/gpu-stage-python.sh."""

import numpy as np
import pytest
import torch

import gradsift
from gradsift import Aggregator, Compressor, Config, host_view

pytestmark = pytest.mark.skipif(
    not (torch.cuda.is_available() and gradsift.has_cuda()),
    reason="needs a CUDA GPU and the wheel built with the cuda feature",
)

from test_ddp import BITS, CASES, full_settings, simulate  # noqa: E402


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("cfg", [dict(method="topk", ratio=0.05, momentum=0.9), dict(method="rtopk", ratio=0.05, r_ratio=0.2, mode="per_layer", seed=3), dict(method="sign")])
def test_step_ptr_equals_cpu(dtype, cfg):
    sizes = [3000, 17, 40000]
    stream = torch.cuda.current_stream()
    gpu = Compressor.cuda(sizes, Config(**cfg), 0, stream.cuda_stream)
    cpu = Compressor(sizes, Config(**cfg))
    g = torch.Generator(device="cuda").manual_seed(0)
    for t in range(4):
        x = torch.randn(sum(sizes), device="cuda", generator=g).to(dtype)
        gpu.step_ptr(x.data_ptr(), x.numel(), str(dtype), t)
        a, h = host_view(x.cpu())
        want = cpu.step(a, t, dtype=h)
        assert gpu.payload() == want
    assert np.array_equal(gradsift.residual(gpu), gradsift.residual(cpu))


def test_aggregate_ptr_equals_cpu():
    sizes = [1000, 24]
    cfgs = [Config("topk", 0.1, worker=w) for w in range(3)]
    ps = [Compressor(sizes, c).step(np.random.default_rng(w).standard_normal(1024).astype(np.float32), 0) for w, c in enumerate(cfgs)]
    stream = torch.cuda.current_stream()
    agg = Aggregator.cuda(sizes, 3, 0, stream.cuda_stream, "global", "senders")
    out = torch.empty(1024, device="cuda")
    agg.aggregate_ptr(ps, out.data_ptr())
    want = np.empty(1024, np.float32)
    Aggregator(sizes, 3, "global", "senders").aggregate(ps, want)
    assert np.array_equal(out.cpu().numpy(), want)


@pytest.mark.parametrize("pg,world", [("nccl", 1), ("gloo", 2)])
@pytest.mark.parametrize(
    "name",
    [
        "topk-dgc-warmup",
        "rtopk-per-layer-senders-bf16",
        # docs/SPEC.md §12 with CUDA buckets: payload and update entries cross, refund on the device
        "sparse-topk-dgc-warmup-reuse",
        "sparse-rtopk-per-layer-senders-bf16",
        "shared-randomk-f32",
    ],
)
def test_hook_cuda_equals_simulation(run_ranks, pg, world, name):
    case = dict(CASES[name], device="cuda:0", pg=pg)
    res = run_ranks(world, case)
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[case.get("dtype", "float32")]
    sim = simulate(full_settings(case), [r["rec"] for r in res], world, dtype)
    for t, expect in enumerate(sim):
        for r in res:
            assert torch.equal(r["rec"][t][2].view(BITS[dtype]), expect.view(BITS[dtype])), f"step {t}"
    # after the first step a hook call allocates no new device memory
    # (DGC's warm-up reconfigures, which may allocate, until its last epoch starts)
    s = full_settings(case)
    first = s["warmup_epochs"] * s["steps_per_epoch"] + 1
    for r in res:
        free = r["free_mem"]
        assert len(free) > first and len(set(free[first:])) == 1, f"free device memory changed: {free}"
