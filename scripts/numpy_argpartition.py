#!/usr/bin/env python3
"""The numpy side of the CPU selection bench: argpartition(abs(x)) at n = 2^24, k = 0.1%.

Run it next to `cargo bench --bench select` on the same machine and compare medians:
    python3 scripts/numpy_argpartition.py
It also times one plain read of the buffer (x.sum()), the floor any selection pays.
"""
import time

import numpy as np


def median_time(f, reps):
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter()
        f()
        ts.append(time.perf_counter() - t0)
    return sorted(ts)[len(ts) // 2]


def main():
    n = 1 << 24
    k = n // 1000
    x = np.random.default_rng(1).standard_normal(n).astype(np.float32)
    t_sel = median_time(lambda: np.argpartition(np.abs(x), n - k)[n - k:], 7)
    t_read = median_time(lambda: x.sum(), 7)
    print(f"numpy {np.__version__}: argpartition(abs(x)) top-{k} of n={n} f32: "
          f"{t_sel * 1e3:.1f} ms median; one read (x.sum()): {t_read * 1e3:.2f} ms; "
          f"ratio {t_sel / t_read:.0f}x")


if __name__ == "__main__":
    main()
