"""A DDP communication hook that sends gradsift-compressed gradients.

Usage (the lines a PyTorch user adds)::

    import gradsift.torch as gst
    model = torch.nn.parallel.DistributedDataParallel(model)
    state = gst.GradsiftState(model, method="topk", ratio=0.01, momentum=0.9)
    model.register_comm_hook(state, gst.gradsift_hook)
    ...
    torch.save({"model": model.state_dict(), "gradsift": state.state_dict()}, path)
    state.load_state_dict(ckpt["gradsift"])          # on resume

Per bucket and step, on every rank (``w`` = rank, ``t`` = the bucket's step count):

1. error-feedback compression of the bucket (float32, float16 or bfloat16) on the bucket's
   device: ``Compressor.step`` on a zero-copy host view (CPU), or ``Compressor.step_ptr`` on
   the tensor's device pointer and a CUDA stream of PyTorch's (CUDA); the payload is
   encoded in gradsift's wire format (docs/SPEC.md §9);
2. **exchange of sizes, then padding**: every rank all-gathers a fixed 6-integer header
   ``[status, message bytes, config fingerprint, step, flags, 0]``; then each message is
   padded with zeros to the largest message of this step and one all-gather moves all of
   them (rows of that common stride). The header all-gather also carries what must agree:
   a rank whose step failed (non-finite gradient) or whose configuration differs makes
   every rank raise the same error, before any payload moves, so nothing hangs and no
   update is applied;
3. aggregation of the K messages in rank order (``Aggregator.aggregate_wire``, over
   workers or over senders), written in place into the bucket, which the hook returns as
   its future's value. This is exactly what the in-process simulation does with K
   compressors (worker ids 0..K-1, the same step numbers) and one aggregator.

Buffers are allocated on the first call of a bucket (and grown only when DGC's warm-up
raises the payload size); later calls allocate no new device memory.
"""


import hashlib
import struct
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from . import Aggregator, Compressor, Config, GradsiftError, NonFiniteError, host_view

__all__ = ["GradsiftState", "gradsift_hook", "ConfigMismatchError", "make_config", "ratio_at", "set_state"]

_DTYPES = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16"}
_HEADER = 6


def ratio_at(settings: dict[str, Any], step: int) -> float:
    """DGC's exponential warm-up: ``max(ratio, 0.25 ** (epoch + 1))`` in the first
    ``warmup_epochs`` epochs, then ``ratio``."""
    s = settings
    if s["warmup_epochs"] and step // s["steps_per_epoch"] < s["warmup_epochs"]:
        return max(s["ratio"], 0.25 ** (step // s["steps_per_epoch"] + 1))
    return s["ratio"]


def make_config(settings: dict[str, Any], step: int, worker: int) -> Config:
    """The :class:`gradsift.Config` that :class:`GradsiftState` ``settings`` give worker
    ``worker`` at ``step`` (what an in-process simulation of the K ranks uses)."""
    s = settings
    k = ratio_at(s, step)
    r = None
    if s["method"] == "rtopk":
        r = min(1.0, 5 * k) if s["r_ratio"] is None else max(s["r_ratio"], k)
    return Config(
        s["method"],
        None if s["method"] == "sign" else k,
        r_ratio=r,
        mode=s["mode"],
        scale=s["scale"],
        momentum=s["momentum"],
        values=s["values"],
        seed=s["seed"],
        worker=worker,
    )


def set_state(comp: Compressor, config: Config, e: np.ndarray, u: np.ndarray | None) -> None:
    """Sets ``comp``'s residual to ``e`` (and momentum to ``u``) and its configuration to
    ``config``, through the public contract only: reset, then replay steps of a plan that
    sends nothing (k = 0). Without momentum (or with ``u`` zero) the residual is exact, bit
    for bit; with momentum two replay steps set both to f32 rounding."""
    m = np.float32(config.momentum)
    comp.reset()
    comp.reconfigure(Config("topk", k=0, mode=config.mode, momentum=config.momentum))
    if m == 0 or u is None or not u.any():
        comp.step(np.ascontiguousarray(e, np.float32), 0)
        if m != 0:  # the replay step set u = e: drop it (a momentum-free plan has none)
            comp.reconfigure(Config("topk", k=0, mode=config.mode))
    else:
        g1 = (e - u).astype(np.float32)
        comp.step(g1, 0)
        comp.step((u - m * g1).astype(np.float32), 1)
    comp.reconfigure(config)


class ConfigMismatchError(GradsiftError):
    """Ranks run the hook with different configurations (raised on every rank)."""


@dataclass
class _Bucket:
    names: tuple[str, ...]
    sizes: list[int]
    comp: Compressor
    agg: Aggregator
    config: Config
    device: torch.device
    steps: int = 0
    cap: int = 0
    send: torch.Tensor | None = None
    recv: torch.Tensor | None = None
    recv_rows: list[torch.Tensor] = field(default_factory=list)
    send_host: torch.Tensor | None = None
    recv_host: torch.Tensor | None = None
    hdr: torch.Tensor | None = None
    hdrs: torch.Tensor | None = None
    hdr_rows: list[torch.Tensor] = field(default_factory=list)
    out32: torch.Tensor | None = None
    stream: Any = None


class GradsiftState:
    """State of :func:`gradsift_hook`: one compressor per DDP bucket, the configuration,
    the step counters and the traffic counters.

    Args:
        model: the DDP model (or its module): names the parameters for ``state_dict``.
        process_group: the group to all-gather through (default: the world).
        method: 'topk', 'randomk', 'rtopk' or 'sign'.
        ratio: fraction k/n sent (after warm-up).
        r_ratio: rTop-k's candidate fraction r/n (default ``min(1, 5 * ratio)``).
        mode: 'global' (one selection over the bucket) or 'per_layer' (one per parameter).
        average: 'workers' (divide by K) or 'senders' (divide by the ranks that sent a
            coordinate).
        momentum: DGC momentum correction factor in [0, 1); use it instead of the
            optimizer's momentum.
        values: wire format of the values ('float32', 'float16', 'bfloat16').
        scale: 'none' or 'unbiased'.
        seed: seed of the random draws (random-k, rTop-k).
        warmup_epochs, steps_per_epoch: DGC's exponential sparsity warm-up: during epoch
            ``e < warmup_epochs`` the ratio is ``max(ratio, 0.25 ** (e + 1))``.
        backend: 'cpu', 'cuda' or 'auto' (CUDA buckets on a CUDA-enabled build).
    """

    def __init__(
        self,
        model: torch.nn.Module,
        process_group: Any = None,
        *,
        method: str = "topk",
        ratio: float = 0.01,
        r_ratio: float | None = None,
        mode: str = "global",
        average: str = "workers",
        momentum: float = 0.0,
        values: str = "float32",
        scale: str = "none",
        seed: int = 0,
        warmup_epochs: int = 0,
        steps_per_epoch: int = 0,
        backend: str = "auto",
    ) -> None:
        if not (dist.is_available() and dist.is_initialized()):
            raise RuntimeError(
                "gradsift.torch: no process group: call torch.distributed.init_process_group() before building GradsiftState"
            )
        self.process_group = process_group if process_group is not None else dist.group.WORLD
        self.rank = dist.get_rank(self.process_group)
        self.world_size = dist.get_world_size(self.process_group)
        module = getattr(model, "module", model)
        self._names = {id(p): n for n, p in module.named_parameters()}
        if warmup_epochs > 0 and steps_per_epoch <= 0:
            raise ValueError("warmup_epochs needs steps_per_epoch > 0")
        self.settings = dict(
            method=method,
            ratio=float(ratio),
            r_ratio=None if r_ratio is None else float(r_ratio),
            mode=mode,
            average=average,
            momentum=float(momentum),
            values=values,
            scale=scale,
            seed=int(seed),
            warmup_epochs=int(warmup_epochs),
            steps_per_epoch=int(steps_per_epoch),
        )
        self.backend = backend
        self.config_at(0)  # validates the settings now, on every rank
        digest = hashlib.sha256(repr((sorted(self.settings.items()), self.world_size)).encode()).digest()
        self.fingerprint = struct.unpack("<q", digest[:8])[0]
        self._buckets: dict[tuple[str, ...], _Bucket] = {}
        self._pending: dict[str, tuple[np.ndarray, np.ndarray | None]] = {}
        #: Wire bytes this rank sent in the last step (all buckets), before padding.
        self.bytes_sent = 0
        #: Bytes this rank put on the all-gather in the last step (padding included).
        self.bytes_padded = 0
        self._last_step = -1
        self._resume_step = 0

    # -- configuration -----------------------------------------------------------------

    def ratio_at(self, step: int) -> float:
        return ratio_at(self.settings, step)

    def config_at(self, step: int) -> Config:
        """The compressor configuration of this rank at ``step`` (worker id = rank)."""
        return make_config(self.settings, step, self.rank)

    # -- buckets -----------------------------------------------------------------------

    def _bucket(self, bucket: Any, buf: torch.Tensor) -> _Bucket:
        params = bucket.parameters()
        try:
            names = tuple(self._names[id(p)] for p in params)
        except KeyError:
            raise GradsiftError("a bucket holds a parameter that is not in the model given to GradsiftState") from None
        b = self._buckets.get(names)
        if b is not None:
            return b
        # DDP may rebuild its buckets after the first iteration: move the residuals of the
        # buckets this one overlaps, parameter by parameter, so no error feedback is lost.
        start = self._resume_step
        for key in [k for k in self._buckets if set(k) & set(names)]:
            old = self._buckets.pop(key)
            start = max(start, old.steps)
            self._pending.update(self._split(old))
        sizes = [p.numel() for p in params]
        cfg = self.config_at(start)
        use_cuda = buf.is_cuda and self.backend in ("auto", "cuda")
        if buf.is_cuda and not use_cuda:
            raise GradsiftError(f"CUDA bucket with backend={self.backend!r}: use backend='cuda' or 'auto'")
        stream = None
        if use_cuda:
            stream = torch.cuda.Stream(device=buf.device)
            dev = buf.device.index
            comp = Compressor.cuda(sizes, cfg, dev, stream.cuda_stream)
            agg = Aggregator.cuda(sizes, self.world_size, dev, stream.cuda_stream, self.settings["mode"], self.settings["average"])
        else:
            comp = Compressor(sizes, cfg, "cpu")
            agg = Aggregator(sizes, self.world_size, self.settings["mode"], self.settings["average"], "cpu")
        b = _Bucket(names, sizes, comp, agg, cfg, buf.device, steps=start, stream=stream)
        comm = self._comm_device(buf)
        b.hdr = torch.zeros(_HEADER, dtype=torch.int64, device=comm)
        b.hdrs = torch.zeros(self.world_size * _HEADER, dtype=torch.int64, device=comm)
        b.hdr_rows = list(b.hdrs.view(self.world_size, _HEADER).unbind(0))
        if use_cuda:
            b.out32 = torch.empty(buf.numel(), dtype=torch.float32, device=buf.device)
        self._buckets[names] = b
        if any(n in self._pending for n in names):
            self._restore(b)
        return b

    def _comm_device(self, buf: torch.Tensor) -> torch.device:
        if dist.get_backend(self.process_group) == "nccl":
            return buf.device
        return torch.device("cpu")

    def _grow(self, b: _Bucket, need: int, comm: torch.device) -> None:
        cap = max(need, b.comp.max_encoded_len())
        cap = (cap + 63) // 64 * 64
        b.cap = cap
        b.send = torch.zeros(cap, dtype=torch.uint8, device=comm)
        b.recv = torch.zeros(self.world_size * cap, dtype=torch.uint8, device=comm)
        if comm.type == "cuda":
            b.send_host = torch.zeros(cap, dtype=torch.uint8, pin_memory=True)
            b.recv_host = torch.zeros(self.world_size * cap, dtype=torch.uint8, pin_memory=True)

    # -- save / restore ----------------------------------------------------------------

    def _split(self, b: _Bucket) -> dict[str, tuple[np.ndarray, np.ndarray | None]]:
        e = np.empty(b.comp.n, np.float32)
        b.comp.residual_into(e)
        u = np.empty(b.comp.n, np.float32)
        has_u = b.comp.momentum_into(u)
        out, off = {}, 0
        for name, n in zip(b.names, b.sizes):
            out[name] = (e[off : off + n].copy(), u[off : off + n].copy() if has_u else None)
            off += n
        return out

    def _restore(self, b: _Bucket) -> None:
        """Sets the bucket's residual (and momentum) from ``_pending``: the residual is
        replayed through a step that sends nothing (exact, bit for bit); with momentum,
        two such steps (momentum then exact to f32 rounding)."""
        e = np.zeros(b.comp.n, np.float32)
        u = np.zeros(b.comp.n, np.float32)
        off = 0
        for name, n in zip(b.names, b.sizes):
            pe, pu = self._pending.pop(name, (None, None))
            if pe is not None:
                e[off : off + n] = pe
            if pu is not None:
                u[off : off + n] = pu
            off += n
        set_state(b.comp, b.config, e, u)

    def state_dict(self) -> dict[str, Any]:
        """Residuals (and momenta) per parameter name, float32 CPU tensors, plus the step
        counters: save it with the model; :meth:`load_state_dict` resumes without losing
        error feedback."""
        residual, mom = {}, {}
        for b in self._buckets.values():
            for name, (e, u) in self._split(b).items():
                residual[name] = torch.from_numpy(e)
                if u is not None:
                    mom[name] = torch.from_numpy(u)
        for name, (e, u) in self._pending.items():
            residual[name] = torch.from_numpy(e.copy())
            if u is not None:
                mom[name] = torch.from_numpy(u.copy())
        steps = {",".join(b.names): b.steps for b in self._buckets.values()}
        return {
            "version": 1,
            "settings": dict(self.settings),
            "world_size": self.world_size,
            "rank": self.rank,
            "step": max(steps.values(), default=self._last_step + 1),
            "residual": residual,
            "momentum": mom,
        }

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        if sd.get("version") != 1:
            raise GradsiftError(f"unknown gradsift state version {sd.get('version')!r}")
        if sd["settings"] != self.settings or sd["world_size"] != self.world_size:
            raise ConfigMismatchError(
                f"the saved state was made with {sd['settings']} on {sd['world_size']} ranks; this state has {self.settings} on {self.world_size}"
            )
        if sd["rank"] != self.rank:
            raise GradsiftError(f"the saved state is rank {sd['rank']}'s; this is rank {self.rank}")
        self._pending = {
            n: (t.detach().cpu().float().numpy().copy(), sd["momentum"][n].cpu().float().numpy().copy() if n in sd["momentum"] else None)
            for n, t in sd["residual"].items()
        }
        self._resume_step = int(sd["step"])
        old = list(self._buckets.values())
        for b in old:
            b.steps = self._resume_step
            b.config = self.config_at(b.steps)
            b.comp.reconfigure(b.config)
            self._restore(b)
        self._last_step = self._resume_step - 1


def _raise_everywhere(state: GradsiftState, b: _Bucket, hdrs: np.ndarray, step: int, local_error: str | None) -> None:
    """Raises on every rank when any header says so: the same decision from the same data."""
    fp = hdrs[:, 2]
    if (fp != state.fingerprint).any():
        descr: list[Any] = [None] * state.world_size
        dist.all_gather_object(descr, repr(state.settings), group=state.process_group)
        lines = "; ".join(f"rank {r}: {d}" for r, d in enumerate(descr))
        raise ConfigMismatchError(f"gradsift hook: ranks are configured differently ({lines})")
    if (hdrs[:, 3] != hdrs[0, 3]).any():
        raise ConfigMismatchError(f"gradsift hook: ranks are at different steps {hdrs[:, 3].tolist()} of bucket {b.names[0]}...")
    bad = [r for r in range(state.world_size) if hdrs[r, 0] == 1]
    if bad:
        raise NonFiniteError(
            f"gradsift hook: step {step} rejected: non-finite gradient on rank(s) {bad} "
            f"(bucket of {len(b.names)} parameters starting at {b.names[0]!r}); every rank kept its residual "
            f"and momentum, no update was applied"
        )
    over = [r for r in range(state.world_size) if hdrs[r, 0] == 2]
    if over:
        raise NonFiniteError(
            f"gradsift hook: step {step} rejected: the accumulated gradient overflowed on rank(s) {over} "
            f"(bucket starting at {b.names[0]!r}); those ranks kept their residual, the others stepped; "
            f"no update was applied" + (f"; here: {local_error}" if local_error else "")
        )


def gradsift_hook(state: GradsiftState, bucket: dist.GradBucket) -> torch.futures.Future[torch.Tensor]:
    """The DDP communication hook: compress, all-gather, aggregate (see the module doc)."""
    buf = bucket.buffer()
    if buf.dtype not in _DTYPES:
        raise TypeError(
            f"gradsift hook: {buf.dtype} bucket: gradsift takes float32, float16 or bfloat16 gradients"
            + (" (train in float32, or convert the model with .float())" if buf.dtype == torch.float64 else "")
        )
    if not buf.is_contiguous():
        raise ValueError("gradsift hook: the bucket buffer is not contiguous")
    b = state._bucket(bucket, buf)
    step = b.steps
    cfg = state.config_at(step)
    if cfg != b.config:
        b.comp.reconfigure(cfg)  # DGC warm-up: keeps residual and momentum
        b.config = cfg
    comm = b.hdr.device
    if b.send is None or b.cap < b.comp.max_encoded_len():
        state._grow(b, 0, comm)
    dname = _DTYPES[buf.dtype]
    # Phase 1, before anything changes: configuration, step and finiteness of every rank's
    # gradient. Any disagreement or non-finite gradient raises on every rank, and no rank
    # has stepped, so every residual is kept.
    finite = bool(torch.isfinite(buf).all())
    b.hdr.copy_(torch.tensor([0 if finite else 1, 0, state.fingerprint, step, 0, 0], dtype=torch.int64))
    dist.all_gather(b.hdr_rows, b.hdr, group=state.process_group)
    hdrs = b.hdrs.view(state.world_size, _HEADER).cpu().numpy()
    _raise_everywhere(state, b, hdrs, step, None)
    local_error = None
    nbytes = 0
    cur = torch.cuda.current_stream(buf.device) if buf.is_cuda else None
    try:
        if buf.is_cuda:
            b.stream.wait_stream(cur)
            b.comp.step_ptr(buf.data_ptr(), buf.numel(), dname, step)
            b.comp.check()
            nbytes = b.comp.encode_into((b.send_host if b.send_host is not None else b.send).numpy())
            if b.send_host is not None:
                with torch.cuda.stream(b.stream):
                    b.send[:nbytes].copy_(b.send_host[:nbytes], non_blocking=True)
                b.stream.synchronize()
        else:
            x, hint = host_view(buf)
            b.comp.step(x, step, dtype=hint)
            nbytes = b.comp.encode_into(b.send.numpy())
    except NonFiniteError as e:
        local_error = str(e)
    # Phase 2: message sizes, and whether a finite gradient still overflowed (e + g, or a
    # value scaled by 'unbiased'): then every rank raises; the ranks whose step succeeded
    # have advanced their residual (the rare case the pre-check cannot see).
    b.hdr.copy_(torch.tensor([2 if local_error else 0, nbytes, state.fingerprint, step, 1, 0], dtype=torch.int64))
    dist.all_gather(b.hdr_rows, b.hdr, group=state.process_group)
    hdrs = b.hdrs.view(state.world_size, _HEADER).cpu().numpy()
    _raise_everywhere(state, b, hdrs, step, local_error)
    sizes = [int(s) for s in hdrs[:, 1]]
    stride = max(sizes)
    if stride > b.cap:  # cannot happen with the bound of max_encoded_len; kept as a guard
        raise GradsiftError(f"gradsift hook: a message of {stride} bytes exceeds the buffer of {b.cap}")
    b.send[nbytes:stride].zero_()
    rows = list(b.recv[: state.world_size * stride].view(state.world_size, stride).unbind(0))
    dist.all_gather(rows, b.send[:stride], group=state.process_group)
    if buf.is_cuda:
        if b.recv_host is not None:
            b.recv_host[: state.world_size * stride].copy_(b.recv[: state.world_size * stride])
            data = b.recv_host
        else:
            data = b.recv
        from . import Payload

        raw = data.numpy()
        payloads = [Payload.decode(raw[r * stride : r * stride + sizes[r]].tobytes()) for r in range(state.world_size)]
        b.agg.aggregate_ptr(payloads, b.out32.data_ptr())
        with torch.cuda.stream(b.stream):
            buf.copy_(b.out32)
        cur.wait_stream(b.stream)
    else:
        x, hint = host_view(buf)
        b.agg.aggregate_wire(b.recv.numpy(), stride, sizes, x, dtype=hint)
    b.steps += 1
    if step != state._last_step:
        state._last_step = step
        state.bytes_sent = 0
        state.bytes_padded = 0
    state.bytes_sent += nbytes
    state.bytes_padded += stride
    fut: torch.futures.Future[torch.Tensor] = torch.futures.Future()
    fut.set_result(buf)
    return fut
