#!/usr/bin/env python3
"""Bytes received per worker per step for each `--reduce` (docs/SPEC.md §12), measured with
real processes (`mpirun -n K gradsift train --dist mpi`, oversubscribed where K exceeds the
cores), and the test accuracy of the sparse all-reduce against the all-gather at equal k
(in process: the simulation is bit-equal to mpirun, cli/tests/dist.rs).

Usage: scripts/reduce-table.py [--bin target/release/gradsift] [--out docs/reduce/table.md]
Needs a gradsift built with `--features mpi` and OpenMPI's mpirun.
"""
import argparse, json, os, platform, subprocess, sys, tempfile, time

ap = argparse.ArgumentParser()
ap.add_argument("--bin", default="target/release/gradsift")
ap.add_argument("--out", default="docs/reduce/table.md")
ap.add_argument("--workers", default="2,3,4,8")
ap.add_argument("--acc-workers", default="4,8")
ap.add_argument("--acc-seeds", default="0,1")
ap.add_argument("--acc-epochs", type=int, default=10)
args = ap.parse_args()

env = dict(os.environ, OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1",
           OMPI_MCA_rmaps_base_oversubscribe="1")
tmp = tempfile.mkdtemp(prefix="gradsift-reduce-")

def train(extra, k=None):
    out = os.path.join(tmp, "r.json")
    cmd = [args.bin, "train", "--json", out] + extra
    if k is not None:
        cmd = ["mpirun", "--oversubscribe", "--bind-to", "none", "-n", str(k)] + cmd + ["--dist", "mpi"]
    r = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if r.returncode != 0:
        sys.exit(f"failed: {' '.join(cmd)}\n{r.stderr}")
    return json.load(open(out))["runs"][0]

ROWS = [
    ("top-k 1%, all-gather", ["--method", "topk", "--reduce", "allgather"]),
    ("top-k 1%, sparse all-reduce (exact every step)", ["--method", "topk", "--reduce", "sparse"]),
    ("top-k 1%, sparse all-reduce (threshold every 8)", ["--method", "topk", "--reduce", "sparse", "--threshold-every", "8"]),
    ("random-k 50%, all-gather", ["--method", "randomk", "--ratio", "0.5", "--momentum", "0", "--lr", "0.01", "--reduce", "allgather"]),
    ("random-k 50%, shared-key all-reduce", ["--method", "randomk", "--ratio", "0.5", "--momentum", "0", "--lr", "0.01", "--reduce", "shared-randomk"]),
]
ks = [int(x) for x in args.workers.split(",")]
t0 = time.time()
traffic = []
for label, extra in ROWS:
    cells = []
    for k in ks:
        run = train(["--workers", str(k), "--epochs", "1", "--warmup-epochs", "0"] + extra, k)
        e = run["epochs"][-1]
        cells.append((e["received_per_worker_step"], e["received_busiest_worker_step"], e["bits_per_worker_step"] / 8))
    traffic.append((label, cells))
t1 = time.time()
acc = []
seeds = [int(s) for s in args.acc_seeds.split(",")]
for k in [int(x) for x in args.acc_workers.split(",")]:
    for label, mode in [("all-gather", ["--reduce", "allgather"]), ("sparse all-reduce", ["--reduce", "sparse"])]:
        accs, recv = [], []
        for s in seeds:
            run = train(["--method", "topk", "--workers", str(k), "--epochs", str(args.acc_epochs), "--seed", str(s)] + mode)
            accs.append(run["epochs"][-1]["test_accuracy"])
            recv.append(run["epochs"][-1]["received_per_worker_step"])
        acc.append((k, label, accs, sum(recv) / len(recv)))
t2 = time.time()

commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True, text=True).stdout.strip()
cpu = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")), platform.processor())
lines = [
    "# Bytes received per worker per step, by reduction",
    "",
    f"Made by `scripts/reduce-table.py` at commit {commit}{' (uncommitted changes)' if dirty else ''} on "
    f"{os.cpu_count()} cores ({cpu}), {t1 - t0:.0f} s for the traffic, {t2 - t1:.0f} s for the accuracy.",
    "",
    "MNIST MLP (109,386 parameters), one epoch after no warm-up, `mpirun -n K` real processes "
    "(oversubscribed beyond 2), means over the epoch's steps: bytes a worker received / bytes the "
    "worker that received the most in the step received; in parentheses the bytes a worker "
    "sends in its first collective (its payload).",
    "",
    "| reduction | " + " | ".join(f"K = {k}" for k in ks) + " |",
    "|---|" + "---:|" * len(ks),
]
for label, cells in traffic:
    lines.append(f"| {label} | " + " | ".join(f"{r:,.0f} / {b:,.0f} ({s:,.0f})" for r, b, s in cells) + " |")
lines += [
    "",
    f"Test accuracy after {args.acc_epochs} epochs (DGC warm-up 2 epochs, momentum 0.9), top-k 1%, "
    f"seeds {args.acc_seeds}, in process (bit-equal to mpirun):",
    "",
    "| K | reduction | accuracy per seed | mean | received B/step (last epoch) |",
    "|---:|---|---|---:|---:|",
]
for k, label, accs, recv in acc:
    lines.append(f"| {k} | {label} | {', '.join(f'{100*a:.2f}%' for a in accs)} | "
                 f"{100*sum(accs)/len(accs):.2f}% | {recv:,.0f} |")
os.makedirs(os.path.dirname(args.out), exist_ok=True)
open(args.out, "w").write("\n".join(lines) + "\n")
print("\n".join(lines))
