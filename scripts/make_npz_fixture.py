#!/usr/bin/env python3
"""Writes the small .npz fixtures of cli/tests/analyze.rs into tests/data/ (a few KB in all).

    python3 scripts/make_npz_fixture.py

good/: K = 3 workers, 2 steps, 3 layers (y_k = x + n_k per layer, as PyTorch would save them
with np.savez(f"grads_w{k}_s{t}.npz", *grads)), exercising what real files vary in: one file
written by np.savez_compressed, one layer stored in Fortran order, one in float64 and one in
float16. expected.json holds sigma_X^2 and sigma_N^2 per step and layer computed here with
NumPy from the SPEC §8 formulas, for the Rust side to match.
bad_*/: two workers each, the second file broken in one way (shape, NaN, dtype, layer count).
"""
import json
import os

import numpy as np

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests", "data")
SHAPES = [(16, 8), (16,), (4, 16)]
K, STEPS = 3, 2


def write(path, arrays, compressed=False):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    (np.savez_compressed if compressed else np.savez)(path, *arrays)


def good():
    rng = np.random.default_rng(2024)
    expected = []
    for t in range(STEPS):
        scales = [(0.5, 1.0), (2.0, 0.3), (0.05, 0.1)]
        x = [rng.normal(0, sx, s).astype(np.float32) for s, (sx, _) in zip(SHAPES, scales)]
        ys = []
        for k in range(K):
            ys.append([(xl + rng.normal(0, sn, s)).astype(np.float32)
                       for xl, s, (_, sn) in zip(x, SHAPES, scales)])
        # float16 layer: round now so that every consumer sees the same values.
        for k in range(K):
            ys[k][1] = ys[k][1].astype(np.float16).astype(np.float32)
        layers = []
        for l in range(len(SHAPES)):
            y = np.stack([ys[k][l].astype(np.float64).ravel() for k in range(K)])
            ybar = y.mean(axis=0)
            sn2 = ((y - ybar) ** 2).sum() / (y.shape[1] * (K - 1))
            sx2 = max(0.0, ybar.var() - sn2 / K)
            layers.append({"sigma_x2": sx2, "sigma_n2": sn2})
        expected.append({"step": t, "layers": layers})
        for k in range(K):
            arrays = list(ys[k])
            arrays[1] = arrays[1].astype(np.float16)
            if (k, t) == (1, 1):
                arrays[0] = np.asfortranarray(arrays[0])
            if (k, t) == (2, 0):
                arrays[2] = arrays[2].astype(np.float64)
            write(os.path.join(ROOT, "good", f"grads_w{k}_s{t}.npz"), arrays,
                  compressed=(k, t) == (0, 1))
    with open(os.path.join(ROOT, "good", "expected.json"), "w") as f:
        json.dump({"workers": K, "shapes": SHAPES, "steps": expected}, f, indent=1)
        f.write("\n")


def bad():
    rng = np.random.default_rng(7)
    base = [rng.normal(0, 1, (4, 3)).astype(np.float32), rng.normal(0, 1, (3,)).astype(np.float32)]
    variants = {
        "bad_shape": [base[0], np.zeros(4, np.float32)],
        "bad_nan": [base[0], np.array([0.0, np.nan, 1.0], np.float32)],
        "bad_dtype": [base[0].astype(np.int64), base[1]],
        "bad_count": [base[0]],
    }
    for name, second in variants.items():
        write(os.path.join(ROOT, name, "grads_w0_s0.npz"), base)
        write(os.path.join(ROOT, name, "grads_w1_s0.npz"), second)


good()
bad()
