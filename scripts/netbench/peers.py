"""One rank of the peer benchmark (started by scripts/netbench/cluster.sh, once per rank, inside
that rank's network namespace; scripts/netbench/bench.py drives it).

Every method trains the same model from the same initial weights on the same shards of the
embedded MNIST digits through DDP on gloo, one after the other in this one process group:

- ``allreduce``: DDP's own dense float32 all-reduce (no hook);
- ``fp16``: torch's ``fp16_compress_hook``;
- ``powersgd1`` / ``powersgd4``: torch's ``powerSGD_hook`` (rank 1 / 4, error feedback and
  warm start, vanilla all-reduce for the first ``start_powerSGD_iter`` steps: its warm-up);
- ``noop``: torch's ``noop_hook`` (no communication at all: the bound on what any
  compression can gain; its model is not averaged, so its accuracy means nothing);
- ``gs-topk`` / ``gs-rtopk`` / ``gs-randomk``: gradsift's hook at k = 1% (rTop-k: r = 5%),
  DGC momentum correction 0.9 in the hook (the optimizer then runs without momentum);
- ``gs-topk-sparse`` (``-reuse``: threshold recomputed every 32 steps) / ``gs-randomk-shared``:
  the same with ``reduce='sparse'`` / ``'shared-randomk'`` (docs/SPEC.md §12);
- ``floor``: one asynchronous all-gather per bucket of a row as large as gradsift top-k's,
  nothing computed, the bucket left as it is: what the collective alone costs any hook that
  moves that much in one collective (not a training method; its accuracy means nothing).

``--phase timed``: ``--warm`` steps, then ``--steps`` timed steps; per step the wall time of
zero_grad + forward + backward (the hook and its collective) + optimizer step, and the bytes
this rank's interface sent and received over the timed steps (kernel counters of the
namespace's eth0, so TCP/IP headers included). For gradsift also the compression compute
alone: the same bucket's compress + encode and K-message aggregation without any
communication, timed in this process.
``--phase acc``: ``--epochs`` epochs with the test accuracy every ``--eval-every`` steps.
Rank 0 writes the results as JSON to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import os
import time

import numpy as np
import torch
import torch.distributed as dist
from torch.distributed.algorithms.ddp_comm_hooks import debugging_hooks, default_hooks
from torch.distributed.algorithms.ddp_comm_hooks import powerSGD_hook as psgd
from torch.nn.parallel import DistributedDataParallel as DDP

import gradsift
import gradsift.torch as gst

METHODS = ["allreduce", "fp16", "powersgd1", "powersgd4", "noop", "floor", "gs-topk", "gs-rtopk", "gs-randomk"]
GS = {
    "gs-topk": dict(method="topk", ratio=0.01),
    "gs-rtopk": dict(method="rtopk", ratio=0.01, r_ratio=0.05),
    "gs-randomk": dict(method="randomk", ratio=0.01),
    # the reductions of docs/SPEC.md §12 (not in the default list: scripts/netbench/costmodel.py runs them)
    "gs-topk-sparse": dict(method="topk", ratio=0.01, reduce="sparse"),
    "gs-topk-sparse-reuse": dict(method="topk", ratio=0.01, reduce="sparse", threshold_every=32),
    "gs-randomk-shared": dict(method="randomk", ratio=0.01, reduce="shared-randomk"),
    # QSGD at 3 levels (docs/SPEC.md §13, 3 bits per coordinate; not in the default list)
    "gs-qsgd3": dict(method="qsgd", levels=3),
}


def make_model(name: str) -> torch.nn.Module:
    if name == "mlp":  # the crate's embedded-MNIST MLP, 109,386 parameters
        return torch.nn.Sequential(torch.nn.Linear(784, 128), torch.nn.ReLU(), torch.nn.Linear(128, 64), torch.nn.ReLU(), torch.nn.Linear(64, 10))
    if name == "wide":  # one wide hidden layer, 3,256,330 parameters: communication dominates
        return torch.nn.Sequential(torch.nn.Linear(784, 4096), torch.nn.ReLU(), torch.nn.Linear(4096, 10))
    raise SystemExit(f"peers.py: unknown model {name!r} (mlp, wide)")


def iface_bytes() -> tuple[int, int]:
    base = f"/sys/class/net/{os.environ.get('NETBENCH_IFACE', 'eth0')}/statistics"
    with open(f"{base}/tx_bytes") as tx, open(f"{base}/rx_bytes") as rx:
        return int(tx.read()), int(rx.read())


def floor_hook(rows: dict, bucket: dist.GradBucket) -> torch.futures.Future[torch.Tensor]:
    """The ``floor`` method: gradsift top-k's row size (1% of the bucket as u32 index + f32
    value, plus the 48-byte trailer), all-gathered asynchronously; the bucket is returned as
    it is."""
    buf = bucket.buffer()
    if bucket.index() not in rows:
        n = (8 * max(1, buf.numel() // 100) + 48 + 7) // 8 * 8
        rows[bucket.index()] = (torch.zeros(n, dtype=torch.uint8), torch.zeros(dist.get_world_size() * n, dtype=torch.uint8))
    send, recv = rows[bucket.index()]
    work = dist.all_gather_into_tensor(recv, send, async_op=True)
    return work.get_future().then(lambda _: buf)


# DDP checks the hook's annotations as objects; this module's are strings (future import).
floor_hook.__annotations__ = {"rows": dict, "bucket": dist.GradBucket, "return": torch.futures.Future[torch.Tensor]}


def setup(method: str, ddp: DDP, args, steps_per_epoch: int, start_psgd: int):
    """Registers the method's hook; returns (optimizer, gradsift state or None, extra)."""
    momentum = 0.9
    state = None
    if method == "fp16":
        ddp.register_comm_hook(None, default_hooks.fp16_compress_hook)
    elif method.startswith("powersgd"):
        st = psgd.PowerSGDState(process_group=None, matrix_approximation_rank=int(method[-1]), start_powerSGD_iter=start_psgd)
        ddp.register_comm_hook(st, psgd.powerSGD_hook)
    elif method == "noop":
        ddp.register_comm_hook(None, debugging_hooks.noop_hook)
    elif method == "floor":
        ddp.register_comm_hook({}, floor_hook)
    elif method in GS:
        state = gst.GradsiftState(ddp, **GS[method], momentum=0.9, seed=1)
        ddp.register_comm_hook(state, gst.gradsift_hook)
        momentum = 0.0  # DGC: the momentum lives in the hook
    elif method != "allreduce":
        raise SystemExit(f"peers.py: unknown method {method!r} ({', '.join(METHODS)})")
    return torch.optim.SGD(ddp.parameters(), lr=args.lr, momentum=momentum), state


def compression_alone(state: gst.GradsiftState, world: int, reps: int = 30) -> float:
    """Median ms of the hook's compute for one step (all buckets): compress + encode this
    rank's bucket, then aggregate K messages, with no communication."""
    times = []
    buckets = list(state._buckets.values())
    plans = []
    for b in buckets:
        comp = gradsift.Compressor(b.sizes, b.config)
        agg = gradsift.Aggregator(b.sizes, world, state.settings["mode"], state.settings["average"])
        cap = comp.max_encoded_len()
        rows = np.zeros(world * cap, np.uint8)
        g = np.random.default_rng(0).standard_normal(comp.n).astype(np.float32)
        out = np.empty(comp.n, np.float32)
        plans.append((comp, agg, cap, rows, g, out))
    for t in range(reps):
        t0 = time.perf_counter()
        for comp, agg, cap, rows, g, out in plans:
            nb = comp.step_encode_into(g, t, rows[:cap])
            for w in range(1, world):
                rows[w * cap : w * cap + nb] = rows[:nb]
            agg.aggregate_wire(rows, cap, [nb] * world, out)
        times.append(time.perf_counter() - t0)
    return 1000 * float(np.median(times))


def accuracy(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    with torch.no_grad():
        return float((model(x).argmax(1) == y).float().mean())


def run_method(method: str, args, rank: int, world: int, data) -> dict:
    x_all, y_all, train, test = data
    shard = train[rank::world]
    steps_per_epoch = len(shard) // args.batch
    total = args.warm + args.steps if args.phase == "timed" else args.epochs * steps_per_epoch
    # PowerSGD's warm-up: vanilla all-reduce for the first tenth of the accuracy run; in the
    # timed run the warm-up steps, so that every timed step compresses.
    start_psgd = args.warm if args.phase == "timed" else max(2, total // 10)
    torch.manual_seed(args.seed)
    model = make_model(args.model)
    ddp = DDP(model)
    opt, state = setup(method, ddp, args, steps_per_epoch, start_psgd)
    rng = np.random.default_rng(100 + rank)
    order = np.concatenate([rng.permutation(shard) for _ in range(total // steps_per_epoch + 1)])
    times, curve = [], []
    b0 = None
    dist.barrier()
    for s in range(total):
        if args.phase == "timed" and s == args.warm:
            dist.barrier()
            b0 = iface_bytes()
        idx = torch.from_numpy(order[s * args.batch : (s + 1) * args.batch])
        t0 = time.perf_counter()
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(ddp(x_all[idx]), y_all[idx])
        loss.backward()
        opt.step()
        times.append(time.perf_counter() - t0)
        if args.phase == "acc" and ((s + 1) % args.eval_every == 0 or s + 1 == total):
            curve.append((s + 1, accuracy(model, x_all[test], y_all[test])))
    out = dict(method=method, steps_per_epoch=steps_per_epoch, start_powersgd=start_psgd if method.startswith("powersgd") else None,
               params=sum(p.numel() for p in model.parameters()))
    if args.phase == "timed":
        b1 = iface_bytes()
        timed = np.array(times[args.warm :]) * 1000
        out.update(ms_median=float(np.median(timed)), ms_p90=float(np.percentile(timed, 90)), ms_all=timed.tolist(),
                   tx_per_step=(b1[0] - b0[0]) / args.steps, rx_per_step=(b1[1] - b0[1]) / args.steps)
        if state is not None:
            out.update(payload_bytes=state.bytes_sent, row_bytes=state.bytes_padded, received_bytes=state.bytes_received)
            if state.settings["reduce"] == "allgather":  # the reductions' compute is collective
                out.update(compute_ms=compression_alone(state, world))
    else:
        out.update(curve=curve, final_acc=curve[-1][1])
    dist.barrier()
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--phase", choices=["timed", "acc"], required=True)
    ap.add_argument("--model", default="mlp")
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--warm", type=int, default=10)
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--eval-every", type=int, default=10)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--lr", type=float, default=0.05)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    torch.set_num_threads(1)
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    dist.init_process_group("gloo", init_method=f"tcp://{os.environ['MASTER_ADDR']}:{os.environ['MASTER_PORT']}", rank=rank, world_size=world)
    images, labels = gradsift.mnist()
    perm = np.random.default_rng(0).permutation(len(labels))
    data = (torch.from_numpy(images), torch.from_numpy(labels.astype(np.int64)), perm[1000:], perm[:1000])
    results = [run_method(m, args, rank, world, data) for m in args.methods.split(",")]
    if rank == 0:
        meta = dict(phase=args.phase, model=args.model, world=world, rate=os.environ.get("NETBENCH_RATE", "?"),
                    delay=os.environ.get("NETBENCH_DELAY", "0"), batch=args.batch, lr=args.lr, steps=args.steps, warm=args.warm,
                    epochs=args.epochs, torch=torch.__version__)
        with open(args.out, "w") as f:
            json.dump(dict(meta=meta, results=results), f)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
