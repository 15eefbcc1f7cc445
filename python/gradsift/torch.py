"""A DDP communication hook that sends gradsift-compressed gradients.

Usage (the lines a PyTorch user adds)::

    import gradsift.torch as gst
    model = torch.nn.parallel.DistributedDataParallel(model)
    state = gst.GradsiftState(model, method="topk", ratio=0.01, momentum=0.9)
    model.register_comm_hook(state, gst.gradsift_hook)
    ...
    torch.save({"model": model.state_dict(), "gradsift": state.state_dict()}, path)
    state.load_state_dict(ckpt["gradsift"])          # on resume

Per bucket and step, on every rank (``w`` = rank, ``t`` = the bucket's step count), **one
collective**, started asynchronously so that DDP overlaps it with the rest of backward:

1. error-feedback compression of the bucket (float32, float16 or bfloat16) on the bucket's
   device, written straight into this rank's fixed-size message row: for host buckets the
   wire format (docs/SPEC.md §9) padded to ``Compressor.max_encoded_len()`` (a tight bound:
   the Rice code's length for the worst gaps), for CUDA buckets of a sparse method the
   device row of ``Compressor.pack_ptr`` (u32 indices, f32 values, the step status) copied
   device to device on a CUDA stream of PyTorch's. Each row ends in a 48-byte trailer with
   the per-step facts: status (0 accepted, 1 non-finite gradient, 2 overflow of the
   accumulated values, 3 failed with another error), message bytes, step and configuration
   fingerprint. A rank whose step fails (a device error, say) still sends its row, marked
   failed, so that no rank waits in the all-gather for ever; its future raises its own
   error, every other rank's a :class:`GradsiftError` naming it.
2. ``all_gather_into_tensor(..., async_op=True)`` of the rows; the decode and the
   aggregation are chained on its future (``get_future().then``). In the callback every
   rank reads the same K trailers and so takes the same decision: when any rank's step was
   rejected or the ranks disagree, every rank undoes its own step (``Compressor.revert``:
   residual and momentum back to their bits before it) and raises the same error, so no
   update is applied and no error feedback is lost. Otherwise the K messages are
   aggregated in rank order (over workers or over senders) into the bucket, in place,
   which is the future's value. This is exactly what the in-process simulation does with
   K compressors (worker ids 0..K-1, the same step numbers) and one aggregator.

The configuration check (a fingerprint of the settings and the world size, with the slot
size) is its own small blocking all-gather, run at a bucket's first call and whenever its
configuration changes (DGC's warm-up): ranks configured differently raise
:class:`ConfigMismatchError` there, on every rank, before any fixed-size row moves.

Errors raised in the callback reach the training loop through DDP, which wraps them in a
``RuntimeError`` whose message carries the gradsift error's type and text (for example
``NonFiniteError: gradsift hook: step 2 rejected: non-finite gradient on rank(s) [1]``).

Buffers are allocated on the first call of a bucket (and again only when DGC's warm-up
changes the slot size); later calls allocate no new memory. CUDA buckets: with NCCL the
gradient, the rows and the aggregation stay on the device, and only the K trailers (32
bytes a rank) are read by the host to take the decision; with gloo, a host transport, the
compressed rows cross to the host and back, never the gradient. Scaled sign and QSGD on
CUDA buckets have no index/value device row and take the host wire path: compressed on the
device, their payloads (a bit or a few bits per element) cross to the host.
"""


import contextlib
import datetime
import hashlib
import queue
import re
import struct
import threading
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from . import Aggregator, Compressor, Config, GradsiftError, NonFiniteError, Payload, Reducer, host_view

__all__ = ["GradsiftState", "gradsift_hook", "ConfigMismatchError", "CollectiveError", "make_config", "ratio_at", "set_state"]

_DTYPES = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16"}
#: Bytes of the per-step trailer that ends every row: int64 [status, message bytes, step,
#: fingerprint, rejected count, first rejected index].
_TRAILER = 48
#: Status words: accepted, non-finite gradient, overflow of e + g, any other failure of the
#: step (the reductions' status all-gather carries it, so that no rank waits for ever).
_OK, _NONFINITE, _OVERFLOW, _FAILED = 0, 1, 2, 3
_COUNTS = re.compile(r"(\d+) non-finite value\(s\).*?index (\d+)")
#: The reductions (docs/SPEC.md §12): the all-gather of every payload, the sparse
#: all-reduce, and shared-key random-k summed by an all-reduce.
REDUCTIONS = ("allgather", "sparse", "shared-randomk")
#: Settings that older saved states lack, with the value they were made with.
_SETTING_DEFAULTS = dict(reduce="allgather", threshold_every=1, levels=None, error_feedback=True)
#: Methods whose payload is dense (every element sends something): no k, no sparse reduction.
_DENSE = ("sign", "qsgd")


def ratio_at(settings: dict[str, Any], step: int) -> float:
    """DGC's exponential warm-up: ``max(ratio, 0.25 ** (epoch + 1))`` in the first
    ``warmup_epochs`` epochs, then ``ratio``."""
    s = settings
    if s["warmup_epochs"] and step // s["steps_per_epoch"] < s["warmup_epochs"]:
        return max(s["ratio"], 0.25 ** (step // s["steps_per_epoch"] + 1))
    return s["ratio"]


def make_config(settings: dict[str, Any], step: int, worker: int) -> Config:
    """The :class:`gradsift.Config` that :class:`GradsiftState` ``settings`` give worker
    ``worker`` at ``step`` (what an in-process simulation of the K ranks uses). Under
    ``reduce='shared-randomk'`` every worker draws with worker id 0's key, so that all
    send the same indices (docs/SPEC.md §12)."""
    s = settings
    if s.get("reduce") == "shared-randomk":
        worker = 0
    k = ratio_at(s, step)
    r = None
    if s["method"] == "rtopk":
        r = min(1.0, 5 * k) if s["r_ratio"] is None else max(s["r_ratio"], k)
    return Config(
        s["method"],
        None if s["method"] in _DENSE else k,
        levels=s.get("levels"),
        error_feedback=s.get("error_feedback", True),
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


class CollectiveError(GradsiftError):
    """A collective of the hook failed: it timed out (``timeout=`` of :class:`GradsiftState`
    for the reductions' group; ``init_process_group(timeout=)`` for the all-gather, which runs
    on the model's group) or a peer closed its connection. The step that met it applied no
    update and left this rank's residual and momentum as they were. gloo closes a group's
    connections after a timeout, so under the reductions every later step of the state
    raises this error at once, before compressing anything (under the all-gather the model's
    group itself fails the next collective): rebuild the process group and the state
    (``load_state_dict`` keeps the residual) to go on."""


@dataclass
class _Bucket:
    names: tuple[str, ...]
    sizes: list[int]
    comp: Compressor
    agg: Aggregator
    config: Config
    device: torch.device
    steps: int = 0
    #: Message bytes a row holds (before the trailer); ``stride = cap + _TRAILER``.
    cap: int = 0
    stride: int = 0
    #: (fingerprint, cap) the ranks last agreed on in the set-up check.
    agreed: tuple[int, int] | None = None
    #: The rows on the communication device: this rank's, and all K after the all-gather.
    send: torch.Tensor | None = None
    recv: torch.Tensor | None = None
    #: Host views of the rows (host paths): whole rows, this rank's trailer, all K trailers.
    send_np: np.ndarray | None = None
    recv_np: np.ndarray | None = None
    trailer: np.ndarray | None = None
    trailers: np.ndarray | None = None
    #: CUDA buckets: the device row path (sparse methods), its sent count, the pinned host
    #: trailers, and the device rows when the transport (gloo) needs host rows.
    rows: bool = False
    sent: int = 0
    tr_host: torch.Tensor | None = None
    dev_send: torch.Tensor | None = None
    dev_recv: torch.Tensor | None = None
    out32: torch.Tensor | None = None
    stage: torch.Tensor | None = None
    stream: Any = None
    #: The ratio ``config`` was built for, and the slot it needs (``None``: not yet known):
    #: a step whose ratio is the same reuses both without building a Config.
    ratio: float | None = None
    slot: int = 0
    #: Host buckets: (buffer address, its zero-copy view, dtype hint), made once per buffer.
    view: tuple[int, Any, str | None] | None = None
    #: 'sparse' / 'shared-randomk': the reduction planned for ``config`` (``None``: to be
    #: planned), this rank's status row and all K (the trailer's six int64 words).
    reducer: Reducer | None = None
    status: torch.Tensor | None = None
    statuses: torch.Tensor | None = None
    #: CUDA buckets under a reduction: the event the bucket's gradient is ready at, the
    #: update's entries in pinned host memory (int32 indices, float32 values, as
    #: ``Reducer.reduce_entries`` writes them) and their device copies (int64 indices for
    #: ``index_copy_``, values in the bucket's dtype), ``Reducer.max_entries`` long.
    ready: Any = None
    upd: tuple[torch.Tensor, ...] | None = None
    #: All-gather path: this rank's step failed with this error (not a rejection). Its row
    #: still goes out, marked failed, so that no rank waits for it; the future raises it.
    failure: BaseException | None = None

    def host(self, buf: torch.Tensor) -> tuple[Any, str | None]:
        """``host_view(buf)``, cached: DDP hands the same bucket buffer every step."""
        if self.view is None or self.view[0] != buf.data_ptr():
            self.view = (buf.data_ptr(), *host_view(buf))
        return self.view[1], self.view[2]


class GradsiftState:
    """State of :func:`gradsift_hook`: one compressor per DDP bucket, the configuration,
    the step counters and the traffic counters.

    Args:
        model: the DDP model (or its module): names the parameters for ``state_dict``.
        process_group: the group to all-gather through (default: the world).
        method: 'topk', 'randomk', 'rtopk', 'sign' or 'qsgd'.
        ratio: fraction k/n sent (after warm-up; not used by 'sign' and 'qsgd').
        levels: QSGD's quantisation levels s, 1..=127 (docs/SPEC.md §13): each element
            sends ``1 + ceil(log2(s + 1))`` bits; required by, and only taken with,
            method='qsgd'.
        error_feedback: False for QSGD as published (method='qsgd' only): what the
            rounding loses is dropped instead of kept in the residual.
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
        reduce: how the payloads travel (docs/SPEC.md §12). 'allgather' (default): every
            rank's payload to every rank, one asynchronous all-gather per bucket; a rank
            receives ``K - 1`` payloads. 'sparse' (top-k, rTop-k, random-k): the sparse
            all-reduce, the global top-k of the aggregate, what a rank's payload loses to it
            back into its residual; a rank receives about ``2k`` entries whatever ``K``.
            'shared-randomk' (random-k): every rank draws the same indices, and the ``k``
            values are summed by an all-reduce in rank order; about ``2k`` values. The two
            reductions run on a communication thread of their own, in bucket order, so
            that they overlap backward, over a gloo group of their own (whatever the
            model's group runs): per bucket a 48-byte status all-gather (the same
            accept/reject decision on every rank), then the reduction's all-to-all and
            all-gather collectives of the payloads' bytes. A CUDA bucket is compressed on
            the device; only its payload (about k entries) comes to the host, and only
            the update's entries go back, scattered into the bucket on the device, with
            the refund added there (``ef_refund``). That CUDA path has not yet run on a
            GPU.
        threshold_every: under 'sparse', recompute the selection threshold exactly every
            this many steps (1: every step) and reuse it in between.
        timeout: under 'sparse' and 'shared-randomk', how long each collective of the
            reductions' group may wait for the other ranks (a ``datetime.timedelta`` > 0;
            default None: torch's default group timeout, 30 minutes for gloo). A rank that
            stalls longer makes every other rank's step raise :class:`CollectiveError`
            instead of waiting. The all-gather path runs on ``process_group``, whose
            timeout is the one given to ``init_process_group``: passing ``timeout`` with
            reduce='allgather' raises ValueError.

    Raises:
        RuntimeError: no process group is initialised.
        ValueError: a setting out of range or a combination that does not exist.
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
        reduce: str = "allgather",
        threshold_every: int = 1,
        levels: int | None = None,
        error_feedback: bool = True,
        timeout: datetime.timedelta | None = None,
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
        if reduce not in REDUCTIONS:
            raise ValueError(f"reduce={reduce!r}: one of {', '.join(REDUCTIONS)}")
        if reduce == "sparse" and method in _DENSE:
            raise ValueError(f"reduce='sparse' needs a sparse method (topk, rtopk, randomk), not {method!r}")
        if (levels is not None) != (method == "qsgd"):
            raise ValueError(f"levels={levels!r} with method={method!r}: levels is QSGD's, and QSGD needs it")
        if reduce == "shared-randomk" and method != "randomk":
            raise ValueError(f"reduce='shared-randomk' needs method='randomk', not {method!r}")
        if not (isinstance(threshold_every, int) and 1 <= threshold_every <= 100_000):
            raise ValueError(f"threshold_every={threshold_every!r}: an integer in [1, 100000]")
        if timeout is not None:
            if not isinstance(timeout, datetime.timedelta) or timeout <= datetime.timedelta(0):
                raise ValueError(f"timeout={timeout!r}: a datetime.timedelta > 0, or None")
            if reduce == "allgather":
                raise ValueError(
                    "timeout= is the reductions' group's (reduce='sparse' or 'shared-randomk'); reduce='allgather' "
                    "runs on the model's process group: give init_process_group(timeout=) instead"
                )
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
            reduce=reduce,
            threshold_every=int(threshold_every),
            levels=None if levels is None else int(levels),
            error_feedback=bool(error_feedback),
        )
        self.backend = backend
        #: The reductions' transport and communication thread (started at first use), on a
        #: process group of their own: DDP issues collectives of its own on the model's group
        #: from the autograd thread (with find_unused_parameters, the used-parameter map),
        #: and collectives from two threads on one group could meet in different orders on
        #: different ranks. ``new_group`` is collective over the group's members, here.
        self._transport: _TorchTransport | None = None
        self._comm: _CommThread | None = None
        self._reduce_group = None
        #: Set by the first failed collective of the reductions' group: its message. gloo
        #: closes the group's connections after a timeout, and a late message of a peer
        #: could otherwise meet a later step's receive.
        self._broken: str | None = None
        self.timeout = timeout
        if reduce != "allgather":
            # gloo whatever the model's group runs: the reductions move host bytes (the
            # payloads and selections, about k entries), never a bucket.
            self._reduce_group = dist.new_group(
                ranks=dist.get_process_group_ranks(self.process_group),
                backend="gloo",
                use_local_synchronization=True,
                **({} if timeout is None else {"timeout": timeout}),
            )
        self.config_at(0)  # validates the settings now, on every rank
        digest = hashlib.sha256(repr((sorted(self.settings.items()), self.world_size)).encode()).digest()
        self.fingerprint = struct.unpack("<q", digest[:8])[0]
        self._buckets: dict[tuple[str, ...], _Bucket] = {}
        # The steady-state lookup, DDP bucket index -> (its buffer, its _Bucket): holding
        # the buffer keeps its storage alive, so a buffer at the same address is the same
        # bucket of parameters; cleared whenever DDP rebuilds its buckets.
        self._fast: dict[int, tuple[torch.Tensor, _Bucket]] = {}
        self._pending: dict[str, tuple[np.ndarray, np.ndarray | None]] = {}
        #: Wire bytes this rank sent in the last step (all buckets), before padding.
        self.bytes_sent = 0
        #: Bytes this rank put on the all-gather in the last step (its rows: message,
        #: padding to the fixed slot, and trailer); under 'sparse' and 'shared-randomk',
        #: the bytes of its pieces (headers included).
        self.bytes_padded = 0
        #: Bytes this rank received from the others in the last step's reductions
        #: ('sparse' and 'shared-randomk'; the status all-gathers not counted).
        self.bytes_received = 0
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
        hit = self._fast.get(bucket.index())
        if hit is not None and hit[0].data_ptr() == buf.data_ptr() and hit[0].numel() == buf.numel():
            return hit[1]
        b = self._find_bucket(bucket, buf)
        self._fast[bucket.index()] = (buf, b)
        return b

    def _find_bucket(self, bucket: Any, buf: torch.Tensor) -> _Bucket:
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
        self._fast.clear()
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
        if use_cuda:
            b.out32 = torch.empty(buf.numel(), dtype=torch.float32, device=buf.device)
        self._buckets[names] = b
        if any(n in self._pending for n in names):
            self._restore(b)
        return b

    def _comm_thread(self) -> "_CommThread":
        if self._comm is None:
            self._transport = _TorchTransport(self._reduce_group)
            self._comm = _CommThread()
        return self._comm

    def _comm_device(self, buf: torch.Tensor) -> torch.device:
        if dist.get_backend(self.process_group) == "nccl":
            return buf.device
        return torch.device("cpu")

    def _slot(self, b: _Bucket) -> int:
        """Message bytes of one row for the bucket's current configuration."""
        if b.device.type == "cuda":
            row = b.comp.row_len()
            if row is not None:
                return (row + 7) // 8 * 8
        return (b.comp.max_encoded_len() + 7) // 8 * 8

    def _grow(self, b: _Bucket, cap: int, comm: torch.device) -> None:
        """(Re)allocates the rows for a slot of ``cap`` bytes: at a bucket's first call and
        when DGC's warm-up changes the slot, never in the steady state."""
        K = self.world_size
        b.cap, b.stride = cap, cap + _TRAILER
        b.rows = b.device.type == "cuda" and b.comp.row_len() is not None
        b.sent = sum(g[3] for g in b.comp.groups)
        b.send = torch.zeros(b.stride, dtype=torch.uint8, device=comm, pin_memory=comm.type == "cpu" and b.device.type == "cuda")
        b.recv = torch.zeros(K * b.stride, dtype=torch.uint8, device=comm, pin_memory=comm.type == "cpu" and b.device.type == "cuda")
        b.send_np = b.recv_np = b.trailer = b.trailers = b.tr_host = b.dev_send = b.dev_recv = b.stage = None
        if comm.type == "cpu":
            b.send_np, b.recv_np = b.send.numpy(), b.recv.numpy()
            b.trailer = b.send_np[cap:].view(np.int64)
            b.trailers = b.recv_np.reshape(K, b.stride)[:, cap:].view(np.int64)
        else:
            # what the host reads of the K rows: the trailer, after the step status on rows
            b.tr_host = torch.zeros(K, _TRAILER + (32 if b.rows else 0), dtype=torch.uint8, pin_memory=True)
        if b.device.type == "cuda":
            # the host side of this rank's row: the trailer (device rows) or the whole
            # encoded row (the host wire path over NCCL), copied onto the device each step
            b.stage = torch.zeros(_TRAILER if b.rows else b.stride, dtype=torch.uint8, pin_memory=True)
            if b.rows and comm.type == "cpu":
                b.dev_send = torch.zeros(b.stride, dtype=torch.uint8, device=b.device)
                b.dev_recv = torch.zeros(K * b.stride, dtype=torch.uint8, device=b.device)
        b.agreed = None

    def _agree(self, b: _Bucket, step: int) -> None:
        """The set-up check: one small blocking all-gather of (fingerprint, slot, step) at a
        bucket's first call and when its slot changes. Any difference raises
        :class:`ConfigMismatchError` on every rank before a fixed-size row moves."""
        mine = torch.tensor([self.fingerprint, b.cap, step], dtype=torch.int64)
        comm = b.send.device
        allv = torch.zeros(self.world_size * 3, dtype=torch.int64, device=comm)
        dist.all_gather_into_tensor(allv, mine.to(comm), group=self.process_group)
        rows = allv.view(self.world_size, 3).cpu().numpy()
        if (rows[:, 0] != rows[0, 0]).any() or (rows[:, 1] != rows[0, 1]).any():
            descr: list[Any] = [None] * self.world_size
            dist.all_gather_object(descr, repr(self.settings), group=self.process_group)
            lines = "; ".join(f"rank {r}: {d}" for r, d in enumerate(descr))
            raise ConfigMismatchError(f"gradsift hook: ranks are configured differently ({lines})")
        if (rows[:, 2] != step).any():
            raise ConfigMismatchError(f"gradsift hook: ranks are at different steps {rows[:, 2].tolist()} of bucket {b.names[0]}...")
        b.agreed = (self.fingerprint, b.cap)

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
        saved = {**_SETTING_DEFAULTS, **sd["settings"]}
        if saved != self.settings or sd["world_size"] != self.world_size:
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
            b.ratio = None
            b.comp.reconfigure(b.config)
            self._restore(b)
        self._last_step = self._resume_step - 1


def _decide(state: GradsiftState, b: _Bucket, t: np.ndarray, step: int) -> None:
    """Raises when any trailer says so: every rank reads the same K trailers, so every rank
    raises the same error (after undoing its own step, which the caller does)."""
    rows = t.tolist()  # K short rows: plain ints are cheaper to test than array ops
    if all(r[0] == _OK and r[2] == step and r[3] == state.fingerprint for r in rows):
        return
    if any(r[3] != state.fingerprint or r[2] != step for r in rows):
        raise ConfigMismatchError(
            f"gradsift hook: the rows of bucket {b.names[0]}... disagree: steps {t[:, 2].tolist()}, "
            f"fingerprints {t[:, 3].tolist()} (ranks configured differently or out of step)"
        )
    failed = [r for r in range(state.world_size) if rows[r][0] == _FAILED]
    if failed:
        raise GradsiftError(
            f"gradsift hook: step {step} failed on rank(s) {failed} (see their errors); every rank undid its step "
            f"of the bucket starting at {b.names[0]!r}, no update was applied"
        )
    bad = [r for r in range(state.world_size) if rows[r][0] == _NONFINITE]
    over = [r for r in range(state.world_size) if rows[r][0] == _OVERFLOW]
    if bad or over:
        what = []
        if bad:
            what.append(f"non-finite gradient on rank(s) {bad}")
        if over:
            what.append(f"the accumulated gradient overflowed on rank(s) {over}")
        detail = ", ".join(f"rank {r}: {rows[r][4]} non-finite value(s), the first at index {rows[r][5]}" for r in bad + over)
        raise NonFiniteError(
            f"gradsift hook: step {step} rejected: {' and '.join(what)} ({detail}; bucket of {len(b.names)} parameters "
            f"starting at {b.names[0]!r}); every rank kept its residual and momentum, no update was applied"
        )


def _allgather_done(fut: Any, step: int) -> None:
    """Raises what the all-gather of the model's group met (a timeout of
    ``init_process_group(timeout=)``, a closed connection) as :class:`CollectiveError`; the
    callback's handler then reverts the step."""
    try:
        fut.value()
    except RuntimeError as e:
        raise CollectiveError(
            f"gradsift hook: step {step}: the all-gather of the model's process group failed: {e}; no update was "
            "applied and this rank's residual is as before the step"
        ) from e


def _finish_host(state: GradsiftState, b: _Bucket, buf: torch.Tensor, step: int, fut: Any) -> torch.Tensor:
    """The future's callback, host rows: decide, then decode and aggregate into ``buf``."""
    failure, b.failure = b.failure, None
    try:
        _allgather_done(fut, step)
        if failure is not None:
            raise failure
        if b.recv_np is None:  # NCCL rows of the host wire path (sign and QSGD on CUDA)
            b.tr_host.copy_(b.recv.view(state.world_size, b.stride)[:, b.cap :])
            t = b.tr_host.numpy().view(np.int64)
        else:
            t = b.trailers
        _decide(state, b, t, step)
        sizes = t[:, 1].tolist()
        if buf.is_cuda:
            host = b.recv_np if b.recv_np is not None else b.recv.cpu().numpy()
            payloads = [Payload.decode(host[r * b.stride : r * b.stride + sizes[r]].tobytes()) for r in range(state.world_size)]
            b.stream.wait_stream(torch.cuda.current_stream(buf.device))
            b.agg.aggregate_ptr(payloads, b.out32.data_ptr())
            with torch.cuda.stream(b.stream):
                buf.copy_(b.out32)
            torch.cuda.current_stream(buf.device).wait_stream(b.stream)
        else:
            x, hint = b.host(buf)
            b.agg.aggregate_wire(b.recv_np, b.stride, sizes, x, dtype=hint)
    except BaseException:
        if failure is None:  # a step that failed changed nothing: a revert would undo the one before
            b.comp.revert()
        raise
    b.steps += 1
    return buf


def _finish_rows(state: GradsiftState, b: _Bucket, buf: torch.Tensor, step: int, fut: Any) -> torch.Tensor:
    """The future's callback, CUDA device rows: the K trailers (and the step statuses
    before them) come to the host, 64 bytes a rank; rows and aggregation stay on the device."""
    failure, b.failure = b.failure, None
    try:
        _allgather_done(fut, step)
        if failure is not None:
            raise failure
        dev = buf.device
        cur = torch.cuda.current_stream(dev)
        rows = b.recv
        if b.dev_recv is not None:  # gloo: the rows arrived on the host
            with torch.cuda.stream(b.stream):
                b.dev_recv.copy_(b.recv, non_blocking=True)
            rows = b.dev_recv
        else:
            b.stream.wait_stream(cur)
        # the packed row ends in the step status (bad_count first), then comes the trailer
        view = rows.view(state.world_size, b.stride)
        with torch.cuda.stream(b.stream):
            b.tr_host.copy_(view[:, b.cap - 32 :])
        words = b.tr_host.numpy().view(np.int64)
        t = words[:, 4:].copy()
        # a failed rank's row holds no status of this step: its trailer already says failed
        rejected = (words[:, 0] != 0) & (t[:, 0] == _OK)
        if rejected.any():
            # the device status: bad_count (u64), then first_bad (u32)
            t[rejected, 0] = _NONFINITE
            t[rejected, 4] = words[rejected, 0]
            t[rejected, 5] = words[rejected, 1] & 0xFFFFFFFF
        _decide(state, b, t, step)
        b.agg.aggregate_rows_ptr(rows.data_ptr(), b.stride, b.sent, b.out32.data_ptr())
        with torch.cuda.stream(b.stream):
            buf.copy_(b.out32)
        cur.wait_stream(b.stream)
    except BaseException:
        if failure is None:
            b.comp.revert()
        raise
    b.steps += 1
    return buf


def _undo(b: _Bucket, e: BaseException) -> None:
    """Undoes an accepted step whose row could not be made. The row must still go out, so a
    failing undo (a broken device, say) is noted on ``e``, not raised."""
    try:
        b.comp.revert()
    except Exception as r:  # noqa: BLE001
        e.add_note(f"gradsift hook: undoing the step failed too: {r}")


def _send_rows(state: GradsiftState, b: _Bucket, buf: torch.Tensor, step: int) -> int:
    """CUDA sparse buckets: step and pack on the plan's stream, device to device."""
    b.failure = None
    cur = torch.cuda.current_stream(buf.device)
    b.stream.wait_stream(cur)
    dst = b.dev_send if b.dev_send is not None else b.send
    status, nbytes, stepped = _OK, b.comp.row_len(), False
    try:
        b.comp.step_ptr(buf.data_ptr(), buf.numel(), _DTYPES[buf.dtype], step)
        stepped = True
        b.comp.pack_ptr(dst.data_ptr(), b.cap)
    except Exception as e:  # noqa: BLE001 - the row still goes out, marked failed (see _Bucket.failure)
        if stepped:  # the step went in but its row did not: undo it here, the future will not
            _undo(b, e)
        status, nbytes, b.failure = _FAILED, 0, e
    b.stage.numpy().view(np.int64)[:] = (status, nbytes, step, state.fingerprint, 0, 0)
    if status == _FAILED and b.dev_send is not None:
        # gloo: the trailer goes straight into the host row, past a device that may be broken
        b.send[b.cap :].copy_(b.stage)
        return nbytes
    with torch.cuda.stream(b.stream):
        dst[b.cap :].copy_(b.stage, non_blocking=True)
        if b.dev_send is not None:  # gloo: the row goes to the host
            b.send.copy_(b.dev_send)
    cur.wait_stream(b.stream)
    return nbytes


def _send_host(state: GradsiftState, b: _Bucket, buf: torch.Tensor, step: int) -> int:
    """Host buckets (and scaled sign and QSGD on CUDA): compress into this rank's row, wire
    format."""
    b.failure = None
    status, nbytes, count, first, stepped = _OK, 0, 0, 0, False
    try:
        if buf.is_cuda:
            b.stream.wait_stream(torch.cuda.current_stream(buf.device))
            b.comp.step_ptr(buf.data_ptr(), buf.numel(), _DTYPES[buf.dtype], step)
            # from here an undo is due on any failure but a rejection (after which a CUDA
            # revert changes nothing)
            stepped = True
            b.comp.check()
            stage = b.send_np if b.send_np is not None else b.stage.numpy()
            nbytes = b.comp.encode_into(stage[: b.cap])
        else:
            x, hint = b.host(buf)
            nbytes = b.comp.step_encode_into(x, step, b.send_np[: b.cap], dtype=hint)
    except NonFiniteError as e:
        # rare: only now is it worth telling a non-finite gradient from an overflow of e + g
        status = _NONFINITE if not bool(torch.isfinite(buf).all()) else _OVERFLOW
        m = _COUNTS.search(str(e))
        count, first = (int(m[1]), int(m[2])) if m else (0, 0)
    except Exception as e:  # noqa: BLE001 - the row still goes out, marked failed (see _Bucket.failure)
        if stepped:  # enqueued, then it or its encoding failed: undo it here, the future will not
            _undo(b, e)
        status, nbytes, b.failure = _FAILED, 0, e
    if b.send_np is not None:
        b.send_np[nbytes : b.cap] = 0  # deterministic padding bytes on the wire
        b.trailer[:] = (status, nbytes, step, state.fingerprint, count, first)
    else:  # NCCL rows of the host wire path
        row = b.stage.numpy()
        row[nbytes : b.cap] = 0
        row[b.cap :].view(np.int64)[:] = (status, nbytes, step, state.fingerprint, count, first)
        b.send.copy_(b.stage)
    return nbytes


class _CommThread:
    """One daemon thread that runs the reductions' jobs in submission order: DDP hands the
    buckets to the hook in the same order on every rank, so every rank issues the same
    collectives in the same order while backward goes on in the caller's thread."""

    def __init__(self) -> None:
        self._jobs: queue.SimpleQueue = queue.SimpleQueue()
        threading.Thread(target=self._run, name="gradsift-comm", daemon=True).start()

    def submit(self, job: Any) -> torch.futures.Future[torch.Tensor]:
        fut: torch.futures.Future[torch.Tensor] = torch.futures.Future()
        self._jobs.put((job, fut))
        return fut

    def _run(self) -> None:
        while True:
            job, fut = self._jobs.get()
            try:
                out = job()
            except BaseException as e:  # noqa: BLE001 - handed to the waiting training loop
                fut.set_exception(e)
            else:
                fut.set_result(out)


@contextlib.contextmanager
def _collective(what: str) -> Any:
    """torch.distributed's errors (gloo raises RuntimeError for a timeout and a closed
    connection alike) as :class:`CollectiveError`, so the hook can tell them from its own."""
    try:
        yield
    except CollectiveError:
        raise
    except RuntimeError as e:
        raise CollectiveError(f"{what}: {e}") from e


class _TorchTransport:
    """The collectives of ``gradsift.Reducer`` over a ``torch.distributed`` process group
    (CPU tensors: gloo): variable-length byte strings, all-gathered in ``ceil(log2 K)``
    rounds of point-to-point messages (Bruck) or sent as a size exchange then one
    all-to-all with split sizes (buffers grow and are reused), and the integer all-reduce of
    the selection's histograms by recursive doubling."""

    def __init__(self, group: Any) -> None:
        self.group = group
        self.rank = dist.get_rank(group)
        self.world_size = dist.get_world_size(group)
        self._sizes = torch.zeros(self.world_size, dtype=torch.int64)
        self._splits = torch.zeros(self.world_size, dtype=torch.int64)
        self._send = torch.zeros(0, dtype=torch.uint8)
        self._recv = torch.zeros(0, dtype=torch.uint8)

    # What gradsift.Reducer calls: a failed collective raises CollectiveError, which the
    # Reducer hands back as itself.
    def all_gather(self, mine: bytes) -> list[bytes]:
        with _collective("all_gather"):
            return self._all_gather(mine)

    def all_reduce_sum(self, words: bytes) -> bytes:
        with _collective("all_reduce_sum"):
            return self._all_reduce_sum(words)

    def all_to_all(self, pieces: list[bytes]) -> list[bytes]:
        with _collective("all_to_all"):
            return self._all_to_all(pieces)

    def _room(self, send: int, recv: int) -> None:
        if self._send.numel() < send:
            self._send = torch.zeros(max(send, 2 * self._send.numel()), dtype=torch.uint8)
        if self._recv.numel() < recv:
            self._recv = torch.zeros(max(recv, 2 * self._recv.numel()), dtype=torch.uint8)

    def _all_gather(self, mine: bytes) -> list[bytes]:
        """Every rank's bytes, in rank order, by Bruck's algorithm: in round ``d = 1, 2,
        4, ..`` a rank sends the pieces it holds of ranks ``me .. me + d - 1`` (at most
        ``K - d`` of them) to rank ``me - d`` and receives those of ``me + d ..`` from rank
        ``me + d`` (mod ``K``), their lengths first. ``ceil(log2 K)`` rounds of two
        messages, where gloo's ring all-gather takes ``K - 1`` (twice: sizes, then the
        padded pieces); each rank still receives each other piece once, unpadded."""
        K, me = self.world_size, self.rank
        held = [mine]  # held[j]: the piece of rank (me + j) % K
        d = 1
        while d < K:
            n = min(d, K - d)
            to, frm = (me - d) % K, (me + d) % K
            lens = torch.tensor([len(x) for x in held[:n]], dtype=torch.int64)
            theirs = torch.empty(n, dtype=torch.int64)
            sent = dist.isend(lens, group=self.group, group_dst=to)
            dist.recv(theirs, group=self.group, group_src=frm)
            sent.wait()
            sizes = theirs.tolist()
            if min(sizes) < 0:
                raise RuntimeError(f"all_gather: rank {frm} announced a piece of {min(sizes)} bytes")
            out, back = sum(lens.tolist()), sum(sizes)
            self._room(out, back)
            self._send.numpy()[:out] = np.frombuffer(b"".join(held[:n]), np.uint8)
            sent = dist.isend(self._send[:out], group=self.group, group_dst=to)
            dist.recv(self._recv[:back], group=self.group, group_src=frm)
            sent.wait()
            got, at = self._recv.numpy(), 0
            for size in sizes:
                held.append(got[at : at + size].tobytes())
                at += size
            d *= 2
        return [held[(w - me) % K] for w in range(K)]

    def _all_reduce_sum(self, words: bytes) -> bytes:
        """Wrapping sums of little-endian u32 words over the group (the selection's
        histograms, SPEC §12), by recursive doubling: with ``p`` the largest power of two
        ``<= K``, rank ``p + j`` first folds its words into rank ``j``; ranks ``0..p``
        exchange and add with the rank ``d`` apart for ``d = 1, 2, .., p/2``; rank ``j``
        then sends the sum back to rank ``p + j``. ``log2 p`` rounds (two more when ``K``
        is not a power of two) of one message each way, where gloo's ring all-reduce
        takes ``2 (K - 1)``; no size exchange, as every rank sums the same length. The
        sums wrap, so the bits do not depend on the order."""
        K, me = self.world_size, self.rank
        acc = np.frombuffer(words, dtype="<u4").copy()
        if K == 1:
            return acc.tobytes()
        # gloo sends int32 tensors; the words are reinterpreted, never converted
        mine = torch.from_numpy(acc.view(np.int32))
        theirs = torch.empty_like(mine)
        p = 1 << (K.bit_length() - 1)
        if me >= p:
            dist.send(mine, group=self.group, group_dst=me - p)
            dist.recv(mine, group=self.group, group_src=me - p)
            return acc.tobytes()
        if me + p < K:
            dist.recv(theirs, group=self.group, group_src=me + p)
            acc += theirs.numpy().view(np.uint32)
        d = 1
        while d < p:
            sent = dist.isend(mine, group=self.group, group_dst=me ^ d)
            dist.recv(theirs, group=self.group, group_src=me ^ d)
            sent.wait()
            acc += theirs.numpy().view(np.uint32)
            d <<= 1
        if me + p < K:
            dist.send(mine, group=self.group, group_dst=me + p)
        return acc.tobytes()

    def _all_to_all(self, pieces: list[bytes]) -> list[bytes]:
        ins = [len(p) for p in pieces]
        self._splits[:] = torch.tensor(ins, dtype=torch.int64)
        dist.all_to_all_single(self._sizes, self._splits, group=self.group)
        outs = self._sizes.tolist()
        self._room(sum(ins), sum(outs))
        self._send.numpy()[: sum(ins)] = np.frombuffer(b"".join(pieces), np.uint8)
        dist.all_to_all_single(self._recv[: sum(outs)], self._send[: sum(ins)], outs, ins, group=self.group)
        got, at, out = self._recv.numpy(), 0, []
        for n in outs:
            out.append(got[at : at + n].tobytes())
            at += n
        return out


def _reduce(state: GradsiftState, b: _Bucket, buf: torch.Tensor, step: int) -> torch.Tensor:
    """A bucket under 'sparse' or 'shared-randomk', on the communication thread: the step,
    a status all-gather (every rank takes the same decision, as on the all-gather path),
    the reduction into ``buf`` and the refund; any failure undoes this rank's step."""
    if state._broken is not None:
        raise CollectiveError(
            f"gradsift hook: step {step} not run: the reductions' group failed at {state._broken}; rebuild the "
            "process group and the GradsiftState"
        )
    cfg = state.config_at(step)
    if cfg != b.config:
        b.comp.reconfigure(cfg)  # DGC warm-up: keeps residual and momentum
        b.config, b.reducer = cfg, None
    if b.reducer is None:
        s = state.settings
        b.reducer = Reducer(b.sizes, b.config, state.world_size, s["reduce"], s["average"], s["threshold_every"])
        b.status = torch.zeros(6, dtype=torch.int64)
        b.statuses = torch.zeros(6 * state.world_size, dtype=torch.int64)
        if buf.is_cuda and (b.upd is None or b.upd[0].numel() < b.reducer.max_entries):
            # empty, not zeros: a fill would run on this thread's stream, unordered with the
            # plan's; every entry is written before it is read
            m = b.reducer.max_entries
            f32 = torch.empty(m, dtype=torch.float32, device=buf.device)
            b.upd = (
                torch.empty(m, dtype=torch.int32, pin_memory=True),
                torch.empty(m, dtype=torch.float32, pin_memory=True),
                torch.empty(m, dtype=torch.int32, device=buf.device),
                torch.empty(m, dtype=torch.int64, device=buf.device),
                f32,
                f32 if buf.dtype == torch.float32 else torch.empty(m, dtype=buf.dtype, device=buf.device),
            )
    if buf.is_cuda:
        with torch.cuda.device(buf.device), torch.cuda.stream(b.stream):
            return _reduce_steps(state, b, buf, step)
    return _reduce_steps(state, b, buf, step)


def _reduce_steps(state: GradsiftState, b: _Bucket, buf: torch.Tensor, step: int) -> torch.Tensor:
    status, count, first, payload, failure = _OK, 0, 0, None, None
    x, hint = (None, None) if buf.is_cuda else b.host(buf)
    try:
        if buf.is_cuda:  # on the plan's stream, once backward has written the bucket
            b.stream.wait_event(b.ready)
            b.comp.step_ptr(buf.data_ptr(), buf.numel(), _DTYPES[buf.dtype], step)
            payload = b.comp.payload()  # k entries to the host, never the bucket
        else:
            payload = b.comp.step(x, step, dtype=hint)
    except NonFiniteError as e:
        status = _NONFINITE if not bool(torch.isfinite(buf).all()) else _OVERFLOW
        m = _COUNTS.search(str(e))
        count, first = (int(m[1]), int(m[2])) if m else (0, 0)
    except Exception as e:  # noqa: BLE001 - still takes part in the status exchange below
        status, failure = _FAILED, e
    try:
        b.status.numpy()[:] = (status, 0 if payload is None else len(payload), step, state.fingerprint, count, first)
        with _collective("the status all-gather"):
            dist.all_gather_into_tensor(b.statuses, b.status, group=state._reduce_group)
        if failure is not None:
            raise failure
        _decide(state, b, b.statuses.numpy().reshape(state.world_size, 6), step)
        if buf.is_cuda:
            sent, received = _reduce_cuda(state, b, buf, payload, step)
        else:
            refunds, sent, received = b.reducer.reduce([payload], step, x, dtype=hint, transport=state._transport)
            for back in refunds:
                b.comp.refund(back)
    except BaseException as e:
        if payload is not None:  # a step that failed changed nothing: a revert would undo the one before
            b.comp.revert()
        if isinstance(e, CollectiveError):
            state._broken = f"step {step}: {e}"
            raise CollectiveError(
                f"gradsift hook: step {step}: a collective of the reductions' group failed: {e}; no update was applied "
                "and this rank's residual is as before the step; the group is closed: rebuild the process group and "
                "the GradsiftState"
            ) from e
        raise
    if step != state._last_step:
        state._last_step = step
        state.bytes_sent = state.bytes_padded = state.bytes_received = 0
    state.bytes_sent += sent
    state.bytes_padded += sent
    state.bytes_received += received
    b.steps += 1
    return buf


def _reduce_cuda(state: GradsiftState, b: _Bucket, buf: torch.Tensor, payload: Payload, step: int) -> tuple[int, int]:
    """A CUDA bucket's reduction on the current stream (the plan's): the update's entries
    (about k) go up and are scattered into the zeroed bucket, the refunds are added on the
    device (``ef_refund``); the job returns once the stream is done, so the future's
    bucket is complete when DDP reads it."""
    idx_h, val_h, idx32, idx64, val32, val_b = b.upd
    c, refunds, sent, received = b.reducer.reduce_entries(
        [payload], step, idx_h.numpy(), val_h.numpy(), transport=state._transport
    )
    for back in refunds:
        b.comp.refund(back)
    idx32[:c].copy_(idx_h[:c], non_blocking=True)
    val32[:c].copy_(val_h[:c], non_blocking=True)
    idx64[:c].copy_(idx32[:c])
    if val_b is not val32:
        val_b[:c].copy_(val32[:c])  # round to nearest even, as the host path's write_out
    buf.zero_()
    buf.index_copy_(0, idx64[:c], val_b[:c])
    b.stream.synchronize()  # the pinned entries are reused by the next step
    return sent, received


def gradsift_hook(state: GradsiftState, bucket: dist.GradBucket) -> torch.futures.Future[torch.Tensor]:
    """The DDP communication hook: compress into a fixed row, start one asynchronous
    all-gather, and aggregate on its future (see the module doc)."""
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
    if state.settings["reduce"] != "allgather":
        if buf.is_cuda:
            if b.ready is None:
                b.ready = torch.cuda.Event()
            b.ready.record(torch.cuda.current_stream(buf.device))
        return state._comm_thread().submit(lambda: _reduce(state, b, buf, step))
    ratio = state.ratio_at(step)
    if ratio != b.ratio:  # the configuration is a function of the ratio alone
        cfg = state.config_at(step)
        if cfg != b.config:
            b.comp.reconfigure(cfg)  # DGC warm-up: keeps residual and momentum
            b.config = cfg
        b.ratio, b.slot = ratio, state._slot(b)
    cap = b.slot
    if b.send is None or b.cap != cap:
        state._grow(b, cap, state._comm_device(buf))
    if b.agreed != (state.fingerprint, b.cap):
        state._agree(b, step)
    nbytes = _send_rows(state, b, buf, step) if b.rows else _send_host(state, b, buf, step)
    if step != state._last_step:
        state._last_step = step
        state.bytes_sent = 0
        state.bytes_padded = 0
    state.bytes_sent += nbytes
    state.bytes_padded += b.stride
    work = dist.all_gather_into_tensor(b.recv, b.send, group=state.process_group, async_op=True)
    if b.rows:
        return work.get_future().then(lambda fut: _finish_rows(state, b, buf, step, fut))
    return work.get_future().then(lambda fut: _finish_host(state, b, buf, step, fut))
