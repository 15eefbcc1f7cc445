"""The peer benchmark on the namespace cluster: every method of scripts/netbench/peers.py at
every link rate, K ranks, both models, in one run; writes the raw results, a Markdown table
and a plot of time per step against bandwidth.

    sudo .cache/venv/bin/python scripts/netbench/bench.py --out docs/netbench        # the full run
    sudo .cache/venv/bin/python scripts/netbench/bench.py --quick --out /tmp/nb      # a smoke run

Needs root (scripts/netbench/cluster.sh), the gradsift wheel and torch in the Python that runs
it (scripts/test-python.sh builds both into .cache/venv) and, for the plot, matplotlib.

Accuracy does not depend on the link: every rank computes the same bits whatever the rate
(the CI cluster test checks the hook against the simulation across shaped links), so the
accuracy run goes once per (model, K) on the unshaped cluster, and the time to the target
accuracy at a rate is the steps to the target times that rate's median step time (for
PowerSGD: its all-reduce warm-up steps at all-reduce's time, the rest at its own).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
RATES = ["100mbit", "1gbit", "10gbit", "unshaped"]
RATE_GBIT = {"100mbit": 0.1, "1gbit": 1.0, "10gbit": 10.0, "unshaped": None}
LABEL = {
    "allreduce": "all-reduce (dense f32)",
    "fp16": "torch fp16_compress_hook",
    "powersgd1": "torch PowerSGD rank 1",
    "powersgd4": "torch PowerSGD rank 4",
    "noop": "torch noop_hook (bound)",
    "floor": "one async all-gather of top-k's row, no compute",
    "gs-topk": "gradsift top-k 1%",
    "gs-rtopk": "gradsift rTop-k 1% (r 5%)",
    "gs-randomk": "gradsift random-k 1%",
    "gs-topk-sparse": "gradsift top-k 1%, sparse all-reduce",
    "gs-topk-sparse-reuse": "gradsift top-k 1%, sparse all-reduce (threshold every 32)",
    "gs-randomk-shared": "gradsift random-k 1%, shared-key all-reduce",
    "gs-qsgd3": "gradsift QSGD s=3",
}


def cluster(k: int, rate: str, args: list[str], timeout: int) -> None:
    cmd = [os.path.join(HERE, "cluster.sh"), "--ranks", str(k), "--rate", rate, "--timeout", str(timeout), "--",
           sys.executable, os.path.join(HERE, "peers.py"), *args]
    t0 = time.monotonic()
    subprocess.run(cmd, check=True)
    print(f"  K={k} {rate}: {' '.join(args[:4])} ... {time.monotonic() - t0:.0f} s", flush=True)


def commit() -> str:
    try:
        c = subprocess.run(["git", "-C", ROOT, "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", ROOT, "status", "--porcelain", "--", "src", "python", "scripts/netbench", "Cargo.toml"],
                               capture_output=True, text=True).stdout.strip()
        return c + ("+modified" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def machine() -> str:
    model = "?"
    try:
        with open("/proc/cpuinfo") as f:
            model = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), "?")
    except OSError:
        pass
    return f"{os.cpu_count()} cores, {model}, Linux {platform.release()}"


def steps_to(curve: list, target: float) -> int | None:
    return next((s for s, a in curve if a >= target), None)


def summarize(runs: dict, target: float) -> list[dict]:
    """One row per (model, K, rate, method) with the derived figures."""
    rows = []
    for (model, k), per_rate in runs["timed"].items():
        acc = {r["method"]: r for r in runs["acc"][(model, k)]["results"]}
        for rate, res in per_rate.items():
            by = {r["method"]: r for r in res["results"]}
            dense = by["allreduce"]["ms_median"]
            for m, r in by.items():
                a = acc.get(m)
                n = steps_to(a["curve"], target) if a else None
                ttt = None
                if n is not None and m != "noop":
                    if m.startswith("powersgd"):
                        warm = min(n, a["start_powersgd"])
                        ttt = (warm * dense + (n - warm) * r["ms_median"]) / 1000
                    else:
                        ttt = n * r["ms_median"] / 1000
                rows.append(dict(model=model, k=k, rate=rate, method=m, ms=r["ms_median"], p90=r["ms_p90"],
                                 speedup=dense / r["ms_median"], tx=r["tx_per_step"], rx=r["rx_per_step"],
                                 payload=r.get("payload_bytes"), row=r.get("row_bytes"), compute=r.get("compute_ms"),
                                 acc=None if m == "noop" or not a else a["final_acc"], steps_to_target=n, time_to_target=ttt,
                                 params=r["params"]))
    return rows


def table(rows: list[dict], meta: dict) -> str:
    out = [f"Commit {meta['commit']}, {meta['machine']}, torch {meta['torch']}, {meta['date']}; "
           f"batch {meta['batch']} per rank, lr {meta['lr']}, {meta['steps']} timed steps after {meta['warm']}, "
           f"accuracy after {meta['epochs']} epochs, target {100 * meta['target']:.0f}%.", ""]
    for model in dict.fromkeys(r["model"] for r in rows):
        for k in sorted({r["k"] for r in rows if r["model"] == model}):
            sub = [r for r in rows if r["model"] == model and r["k"] == k]
            params = sub[0]["params"]
            out += [f"**{model}** ({params:,} parameters), K = {k}: median / p90 ms per step (speed-up over dense all-reduce)", ""]
            rates = [x for x in RATES if any(r["rate"] == x for r in sub)]
            out.append("| method | " + " | ".join(rates) + " | sent / rank / step | test acc | steps to target | time to target at " + ", ".join(rates) + " |")
            out.append("|---" * (len(rates) + 5) + "|")
            for m in dict.fromkeys(r["method"] for r in sub):
                cells, ttts = [], []
                for rate in rates:
                    r = next((r for r in sub if r["method"] == m and r["rate"] == rate), None)
                    cells.append("-" if r is None else f"{r['ms']:.1f} / {r['p90']:.1f} ({r['speedup']:.1f}x)")
                    ttts.append("-" if r is None or r["time_to_target"] is None else f"{r['time_to_target']:.1f} s")
                # bytes and accuracy from this method's unshaped run, else its first rate's
                mine = [r for r in sub if r["method"] == m]
                u = next((r for r in mine if r["rate"] == "unshaped"), mine[0])
                sent = f"{u['tx'] / 1e3:,.1f} kB" + (f" (row {u['row'] / 1e3:,.1f} kB)" if u["row"] else "")
                acc = "-" if u["acc"] is None else f"{100 * u['acc']:.1f}%"
                stt = "-" if u["steps_to_target"] is None else str(u["steps_to_target"])
                out.append(f"| {LABEL.get(m, m)} | " + " | ".join(cells) + f" | {sent} | {acc} | {stt} | " + ", ".join(ttts) + " |")
            gs = [r for r in sub if r["method"].startswith("gs-") and r["rate"] == "unshaped" and r.get("compute") is not None]
            noop = next((r for r in sub if r["method"] == "noop" and r["rate"] == "unshaped"), None)
            if gs and noop:
                out.append("")
                out.append("Hook overhead at unshaped bandwidth (its time minus noop_hook's) against the compression compute alone: "
                           + "; ".join(f"{LABEL.get(r['method'], r['method'])} {r['ms'] - noop['ms']:.2f} ms vs {r['compute']:.2f} ms" for r in gs) + ".")
            out.append("")
    return "\n".join(out)


def plot(rows: list[dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = list(dict.fromkeys((r["model"], r["k"]) for r in rows))
    fig, axes = plt.subplots(1, len(keys), figsize=(5 * len(keys), 4.2), squeeze=False)
    xs = {"100mbit": 0.1, "1gbit": 1, "10gbit": 10, "unshaped": 40}
    for ax, (model, k) in zip(axes[0], keys):
        for m in dict.fromkeys(r["method"] for r in rows):
            pts = sorted((xs[r["rate"]], r["ms"]) for r in rows if r["model"] == model and r["k"] == k and r["method"] == m)
            if pts:
                style = "-o" if m.startswith("gs-") else ("--" if m == "noop" else "-s")
                ax.plot(*zip(*pts), style, label=LABEL.get(m, m), markersize=4)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xticks(list(xs.values()), ["0.1", "1", "10", "unshaped"])
        ax.set_xlabel("link rate, Gbit/s")
        ax.set_ylabel("median time per step, ms")
        ax.set_title(f"{model}, K = {k}")
        ax.grid(True, which="both", alpha=0.3)
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True)
    ap.add_argument("--models", default="mlp,wide")
    ap.add_argument("--ranks", default="2,4")
    ap.add_argument("--rates", default=",".join(RATES))
    ap.add_argument("--methods", default=None)
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--target", type=float, default=0.90)
    ap.add_argument("--quick", action="store_true", help="a smoke run: MLP, K = 2, two rates, few steps")
    ap.add_argument("--summarize", action="store_true", help="only rebuild the table and plot from OUT/results.json")
    a = ap.parse_args()
    os.makedirs(a.out, exist_ok=True)
    if a.quick:
        a.models, a.ranks, a.rates, a.epochs = "mlp", "2", "100mbit,unshaped", 1
    raw_path = os.path.join(a.out, "results.json")
    if a.summarize:
        with open(raw_path) as f:
            saved = json.load(f)
        meta = saved["meta"]
        runs = {"timed": {}, "acc": {}}
        for e in saved["timed"]:
            runs["timed"].setdefault((e["model"], e["k"]), {})[e["rate"]] = e["data"]
        for e in saved["acc"]:
            runs["acc"][(e["model"], e["k"])] = e["data"]
    else:
        meta = dict(commit=commit(), machine=machine(), date=time.strftime("%Y-%m-%d"), target=a.target, epochs=a.epochs)
        runs = {"timed": {}, "acc": {}}
        tmp = os.path.join(a.out, "raw")
        os.makedirs(tmp, exist_ok=True)
        methods = ["--methods", a.methods] if a.methods else []
        t0 = time.monotonic()
        for model in a.models.split(","):
            for k in map(int, a.ranks.split(",")):
                f = os.path.join(tmp, f"acc-{model}-{k}.json")
                cluster(k, "unshaped", ["--phase", "acc", "--model", model, "--epochs", str(a.epochs), "--out", f, *methods], 1800)
                with open(f) as fh:
                    runs["acc"][(model, k)] = json.load(fh)
                for rate in a.rates.split(","):
                    # the wide model's dense steps take about a second at 100 Mbit/s: fewer of them
                    steps = "12" if a.quick else ("20" if model == "wide" and rate == "100mbit" else "40")
                    f = os.path.join(tmp, f"timed-{model}-{k}-{rate}.json")
                    cluster(k, rate, ["--phase", "timed", "--model", model, "--steps", steps, "--out", f, *methods], 1800)
                    with open(f) as fh:
                        runs["timed"].setdefault((model, k), {})[rate] = json.load(fh)
        first = next(iter(runs["timed"].values()))
        m0 = next(iter(first.values()))["meta"]
        meta.update(batch=m0["batch"], lr=m0["lr"], steps=m0["steps"], warm=m0["warm"], torch=m0["torch"],
                    runtime_s=round(time.monotonic() - t0))
        with open(raw_path, "w") as f:
            json.dump(dict(meta=meta,
                           timed=[dict(model=m, k=k, rate=r, data=d) for (m, k), v in runs["timed"].items() for r, d in v.items()],
                           acc=[dict(model=m, k=k, data=d) for (m, k), d in runs["acc"].items()]), f)
    rows = summarize(runs, meta["target"])
    md = table(rows, meta)
    with open(os.path.join(a.out, "table.md"), "w") as f:
        f.write(md + "\n")
    print(md)
    try:
        plot(rows, os.path.join(a.out, "step_time.png"))
    except ImportError:
        print("bench.py: matplotlib not installed: no plot (pip install matplotlib)", file=sys.stderr)


if __name__ == "__main__":
    main()
