"""Train a small MLP on the embedded MNIST digits across N processes (gloo, 127.0.0.1),
once with gradsift's DDP communication hook and once with plain all-reduce, and print
test accuracy, bytes sent per rank per step and time per step.

    pip install ./python torch
    python examples/ddp_mnist.py --workers 2 --epochs 3 --ratio 0.01

Nothing is downloaded: the 10,000 digits ship inside the gradsift package (gradsift.mnist()).
"""

from __future__ import annotations

import argparse
import os
import socket
import tempfile
import time

import numpy as np
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.nn.parallel import DistributedDataParallel as DDP

import gradsift
import gradsift.torch as gst


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(rank: int, world: int, port: int, args: argparse.Namespace, mode: str, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    images, labels = gradsift.mnist()
    perm = np.random.default_rng(0).permutation(len(labels))
    test, train = perm[:1000], perm[1000:]
    shard = train[rank::world]
    x_all, y_all = torch.from_numpy(images), torch.from_numpy(labels.astype(np.int64))
    torch.manual_seed(args.seed)
    model = torch.nn.Sequential(torch.nn.Linear(784, 128), torch.nn.ReLU(), torch.nn.Linear(128, 10))
    ddp = DDP(model)
    n_params = sum(p.numel() for p in model.parameters())
    steps_per_epoch = len(shard) // args.batch
    state = None
    if mode == "gradsift":
        # The lines a PyTorch user adds: a state and the hook (DGC: momentum correction on
        # the workers, so the optimizer runs without momentum).
        state = gst.GradsiftState(ddp, method="topk", ratio=args.ratio, momentum=0.9,
                                  warmup_epochs=1, steps_per_epoch=steps_per_epoch)
        ddp.register_comm_hook(state, gst.gradsift_hook)
        opt = torch.optim.SGD(ddp.parameters(), lr=args.lr)
    else:
        opt = torch.optim.SGD(ddp.parameters(), lr=args.lr, momentum=0.9)
    rng = np.random.default_rng(100 + rank)
    sent, times = [], []
    for epoch in range(args.epochs):
        order = rng.permutation(shard)
        for s in range(steps_per_epoch):
            idx = torch.from_numpy(order[s * args.batch : (s + 1) * args.batch])
            t0 = time.perf_counter()
            opt.zero_grad()
            loss = torch.nn.functional.cross_entropy(ddp(x_all[idx]), y_all[idx])
            loss.backward()
            opt.step()
            times.append(time.perf_counter() - t0)
            sent.append(state.bytes_sent if state else 4 * n_params)
    with torch.no_grad():
        acc = (model(x_all[test]).argmax(1) == y_all[test]).float().mean().item()
    if rank == 0:
        warm = steps_per_epoch  # after DGC's warm-up epoch
        torch.save(dict(acc=acc, bytes=float(np.mean(sent[warm:] if len(sent) > warm else sent)),
                        ms=1000 * float(np.median(times)), n=n_params, steps=len(times)), out)
    dist.destroy_process_group()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--lr", type=float, default=0.05)
    ap.add_argument("--ratio", type=float, default=0.01)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for mode in ("all-reduce", "gradsift"):
            out = os.path.join(tmp, f"{mode}.pt")
            mp.spawn(run, args=(args.workers, free_port(), args, mode, out), nprocs=args.workers)
            rows.append((mode, torch.load(out)))
    n = rows[0][1]["n"]
    print(f"MLP 784-128-10 ({n} parameters), {args.workers} processes (gloo), {args.epochs} epochs, "
          f"batch {args.batch} per process, {rows[0][1]['steps']} steps")
    print(f"{'':<34} {'bytes sent / rank / step':>24} {'time / step':>12} {'test accuracy':>14}")
    for mode, r in rows:
        label = "all-reduce (dense float32)" if mode == "all-reduce" else f"gradsift hook (top-k {args.ratio:g}, DGC)"
        print(f"{label:<34} {r['bytes']:>24,.0f} {r['ms']:>10.2f} ms {100 * r['acc']:>13.1f}%")


if __name__ == "__main__":
    main()
