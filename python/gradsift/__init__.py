"""gradsift: gradient compression for distributed training.

The Rust crate's backend contract, from Python:

- :class:`Compressor` (a worker's error-feedback compressor), :class:`Aggregator` (the
  server's decoder), :class:`Stats` (per-layer statistics and the K-worker variance
  estimator), :class:`Config`, :class:`Payload` and the wire format
  (:meth:`Payload.encode`, :meth:`Payload.decode`);
- the rate-distortion functions of ``gradsift::rd`` (:func:`sum_rate`, ...);
- :func:`mnist`, the 10,000 MNIST digits the crate embeds;
- :mod:`gradsift.torch`, the DDP communication hook.

Arrays are read in place: NumPy arrays and anything with the buffer protocol directly, CPU
tensors through :func:`host_view` (``tensor.numpy()``, a view), CUDA tensors by device
pointer (:meth:`Compressor.step_ptr`) on PyTorch's current stream.
"""

from __future__ import annotations

import gzip
from typing import Any

import numpy as np

from ._gradsift import (
    Aggregator,
    BackendUnavailableError,
    Compressor,
    Config,
    GradsiftError,
    NonFiniteError,
    Payload,
    Reducer,
    Stats,
    __version__,
    allocate_distortion,
    has_cuda,
    heterogeneous_sum_rate,
    independent_rate,
    log2_binomial,
    mnist_gz,
    sign_distortion,
    sum_rate,
)

__all__ = [
    "Aggregator",
    "BackendUnavailableError",
    "Compressor",
    "Config",
    "GradsiftError",
    "NonFiniteError",
    "Payload",
    "Reducer",
    "Stats",
    "__version__",
    "allocate_distortion",
    "has_cuda",
    "heterogeneous_sum_rate",
    "host_view",
    "independent_rate",
    "log2_binomial",
    "mnist",
    "residual",
    "momentum",
    "sign_distortion",
    "sum_rate",
]


def host_view(x: Any) -> tuple[Any, str | None]:
    """A zero-copy host view of ``x`` for the extension, and the dtype hint it needs.

    A CPU ``torch.Tensor`` becomes ``tensor.numpy()`` (a view; bfloat16 as an int16 view
    with the hint ``'bfloat16'``); anything else is returned as is. Raises ``TypeError`` for
    float64 and ``ValueError`` for non-contiguous tensors: nothing is copied silently.
    """
    mod = type(x).__module__
    if mod.startswith("torch"):
        import torch

        if x.device.type != "cpu":
            raise ValueError(f"host_view: tensor on {x.device}: use Compressor.cuda / step_ptr for CUDA tensors")
        if x.dtype not in (torch.float32, torch.float16, torch.bfloat16):
            raise TypeError(
                f"gradsift takes float32, float16 or bfloat16 tensors, got {x.dtype}"
                + (" (convert with .float())" if x.dtype == torch.float64 else "")
            )
        if not x.is_contiguous():
            raise ValueError("the tensor is not contiguous: pass tensor.contiguous()")
        x = x.detach()
        if x.dtype == torch.bfloat16:
            return x.view(torch.int16).numpy(), "bfloat16"
        return x.numpy(), None
    return x, None


def residual(c: Compressor) -> np.ndarray:
    """The residual ``e`` of ``c`` as a new float32 array."""
    out = np.empty(c.n, np.float32)
    c.residual_into(out)
    return out


def momentum(c: Compressor) -> np.ndarray | None:
    """The momentum ``u`` of ``c`` as a new float32 array, or None without momentum."""
    out = np.empty(c.n, np.float32)
    return out if c.momentum_into(out) else None


def mnist() -> tuple[np.ndarray, np.ndarray]:
    """The 10,000 embedded MNIST digits: images ``float32 [N, 784]`` in [0, 1] and labels
    ``uint8 [N]`` (the data ``gradsift::cli::mnist::Mnist::embedded()`` reads)."""
    raw = gzip.decompress(mnist_gz())
    if raw[:4] != b"MNST":
        raise GradsiftError("embedded MNIST: missing MNST header")
    count = int.from_bytes(raw[4:8], "little")
    rows, cols = raw[8], raw[9]
    labels = np.frombuffer(raw, np.uint8, count, 10).copy()
    pixels = np.frombuffer(raw, np.uint8, count * rows * cols, 10 + count)
    images = pixels.reshape(count, rows * cols).astype(np.float32) / np.float32(255.0)
    return images, labels
