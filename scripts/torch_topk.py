#!/usr/bin/env python3
"""The torch side of the top-k comparison: torch.topk(x.abs(), k) at n = 2^26 f32, k = 0.1%
of n, timed with CUDA events (median of 50 runs after warm-up). Compare with the
`cuda_n2^26/top_k_0.1pct` line of `benches/cuda.rs`; also prints a device copy for scale."""
import json
import sys

import torch


def timed(fn, reps=50, warmup=5):
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        a = torch.cuda.Event(enable_timing=True)
        b = torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b))
    times.sort()
    return times[len(times) // 2]


def main():
    if not torch.cuda.is_available():
        print("SKIPPED: torch sees no CUDA device")
        return 0
    n = 1 << 26
    k = n // 1000
    g = torch.Generator(device="cuda").manual_seed(1)
    x = torch.randn(n, device="cuda", dtype=torch.float32, generator=g)
    y = torch.empty_like(x)
    res = {
        "device": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "n": n,
        "k": k,
        "topk_abs_ms": timed(lambda: torch.topk(x.abs(), k)),
        "topk_only_ms": timed(lambda: torch.topk(x, k)),
        "copy_ms": timed(lambda: y.copy_(x)),
    }
    res["copy_GBps"] = 8 * n / res["copy_ms"] / 1e6
    print(json.dumps(res, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
