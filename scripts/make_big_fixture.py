#!/usr/bin/env python3
"""Writes a large synthetic `gradsift analyze` input without NumPy: K workers x S steps of
.npz files (np.savez layout: stored zip members arr_0, arr_1, ... of little-endian float32
.npy arrays), y_k = x + n_k per layer. For measuring memory and time at scale:

    python3 scripts/make_big_fixture.py OUT_DIR [--workers 5] [--steps 2] [--sizes 2000000,1500000,500000]
    /usr/bin/time -v gradsift analyze OUT_DIR
"""
import argparse
import array
import os
import random
import struct
import zipfile


def npy_bytes(values):
    h = "{'descr': '<f4', 'fortran_order': False, 'shape': (%d,), }" % len(values)
    h += " " * ((64 - (10 + len(h) + 1) % 64) % 64) + "\n"
    return b"\x93NUMPY\x01\x00" + struct.pack("<H", len(h)) + h.encode() + values.tobytes()


def main():
    p = argparse.ArgumentParser()
    p.add_argument("out")
    p.add_argument("--workers", type=int, default=5)
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--sizes", default="2000000,1500000,500000")
    a = p.parse_args()
    sizes = [int(s) for s in a.sizes.split(",")]
    os.makedirs(a.out, exist_ok=True)
    rng = random.Random(2024)
    # A pool of normals reused at random offsets: fast, and enough for a memory benchmark.
    pool = array.array("f", (rng.gauss(0.0, 1.0) for _ in range(1 << 20)))
    pool2 = pool + pool

    def normals(n, scale):
        out = array.array("f")
        while len(out) < n:
            off = rng.randrange(1 << 20)
            take = min(n - len(out), 1 << 20)
            out.extend(pool2[off:off + take])
        return array.array("f", (v * scale for v in out)) if scale != 1.0 else out

    for t in range(a.steps):
        xs = [normals(n, 0.5) for n in sizes]
        for k in range(a.workers):
            path = os.path.join(a.out, f"grads_w{k}_s{t}.npz")
            with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED, allowZip64=True) as z:
                for l, (n, x) in enumerate(zip(sizes, xs)):
                    noise = normals(n, 1.0)
                    y = array.array("f", map(float.__add__, x, noise))
                    z.writestr(f"arr_{l}.npy", npy_bytes(y))
            print(path)


if __name__ == "__main__":
    main()
