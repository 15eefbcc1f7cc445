"""An alpha-beta cost model of the reductions (docs/SPEC.md §12), fitted to the namespace
cluster and extrapolated to K = 1,024 ranks.

    sudo .cache/venv/bin/python scripts/netbench/costmodel.py --out docs/costmodel            # measure + fit
    .cache/venv/bin/python scripts/netbench/costmodel.py --out docs/costmodel --fit-only      # refit saved runs

Measured: scripts/netbench/peers.py (timed phase, the wide MLP, gloo) on cluster.sh at
K = 2, 4, 8 and 1 and 10 Gbit/s for dense all-reduce, gradsift top-k 1% all-gathered, top-k 1%
through the sparse all-reduce (exact threshold every step, and reused for 32 steps), shared-key
random-k 1%, and noop_hook (the step without communication).

The model of one step of scheme m at K ranks and link rate R (bytes/s):

    T_m(K, R) = T_0 + c_m + alpha * A_m(K) + B_m(K) / (eta * R)

- T_0: the step without communication (noop_hook at the same K; in the prediction, K = 2's,
  one rank per machine);
- c_m: the scheme's compute beyond T_0 (fitted, one per scheme, K-independent);
- A_m(K): sequential message rounds, counted from the implementation on gloo: a ring
  all-reduce 2(K-1), a ring all-gather K-1, an all-to-all K-1 (pairwise), and gradsift's
  Python transport sends a size exchange before each all-to-all, all-gathers by Bruck's
  algorithm (ceil(log2 K) rounds of a size and a data message) and sums the selection's
  histograms by recursive doubling (log2 p rounds, +2 when K != p);
- B_m(K): bytes a rank receives per step: fitted as a + b K to the bytes gradsift itself
  counts (the last timed step's ``state.bytes_received``; the all-gather: K - 1 rows of
  ``state.bytes_padded``; dense: 2 (K-1)/K 4n, exact), which is what the
  extrapolation uses; the time fit uses the interface's received bytes (TCP/IP included);
- alpha (s per round) and eta (bandwidth efficiency) are shared by all schemes.
Fitted by least squares on every measured point (c_m, alpha, 1/eta linear); the table
gives each point's error. Beyond K = 8 everything is extrapolation.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from bench import cluster, commit, machine  # noqa: E402

KS = [2, 4, 8]
RATES = {"1gbit": 1e9 / 8, "10gbit": 10e9 / 8}
METHODS = ["noop", "allreduce", "gs-topk", "gs-topk-sparse", "gs-topk-sparse-reuse", "gs-randomk-shared"]
LABEL = {
    "allreduce": "dense ring all-reduce (f32)",
    "gs-topk": "top-k 1%, all-gather",
    "gs-topk-sparse": "top-k 1%, sparse all-reduce (exact every step)",
    "gs-topk-sparse-reuse": "top-k 1%, sparse all-reduce (threshold reused 32 steps)",
    "gs-randomk-shared": "random-k 1%, shared key + all-reduce",
}
#: Radix rounds of the exact selection (4 digits of 8 bits), each one integer all-reduce
#: of the histograms by recursive doubling (docs/SPEC.md §12).
SELECT_ROUNDS = 4


def doubling(k: int) -> int:
    """Message rounds of the Python transport's recursive-doubling all-reduce at ``k``
    ranks: log2 p for the largest power of two p <= k, plus the fold and its return."""
    p = 1 << (k.bit_length() - 1)
    return p.bit_length() - 1 + (2 if p != k else 0)


def rounds(m: str, k: int, exact: float = 1.0) -> float:
    """Sequential message rounds of one step of scheme ``m`` at ``k`` ranks (``exact``: the
    fraction of steps that recompute the threshold)."""
    r = k - 1
    if m == "allreduce":
        return 2 * r
    if m == "gs-topk":
        return r
    status = r  # the 48-byte status all-gather (gloo's ring)
    gather = 2 * (k - 1).bit_length()  # Bruck: ceil(log2 K) rounds of sizes, then bytes
    a2a = 2 * r  # size all-to-all + all-to-all with splits
    allreduce = a2a + gather  # SPEC §12's worker-order all-reduce
    if m == "gs-randomk-shared":
        return status + allreduce
    if m.startswith("gs-topk-sparse"):
        return status + a2a + exact * SELECT_ROUNDS * doubling(k) + gather
    raise ValueError(m)


def measure(raw: str, steps: int, warm: int) -> None:
    os.makedirs(raw, exist_ok=True)
    for k in KS:
        for rate in RATES:
            out = os.path.join(raw, f"K{k}_{rate}.json")
            cluster(k, rate, ["--phase", "timed", "--model", "wide", "--methods", ",".join(METHODS), "--steps", str(steps),
                              "--warm", str(warm), "--out", out], timeout=1800)


def load(raw: str) -> list[dict]:
    pts = []
    for k in KS:
        for rate, bps in RATES.items():
            with open(os.path.join(raw, f"K{k}_{rate}.json")) as f:
                res = {r["method"]: r for r in json.load(f)["results"]}
            for m, r in res.items():
                pts.append(dict(k=k, rate=rate, bps=bps, method=m, ms=r["ms_median"], rx=r["rx_per_step"],
                                received=r.get("received_bytes"), row=r.get("row_bytes"), params=r["params"], noop=res["noop"]["ms_median"]))
    return pts


def fit(pts: list[dict]) -> dict:
    schemes = [m for m in METHODS if m != "noop"]
    rows, y = [], []
    for p in pts:
        if p["method"] == "noop":
            continue
        exact = 1.0 if p["method"] != "gs-topk-sparse-reuse" else 1.0 / 32
        x = [1.0 if p["method"] == m else 0.0 for m in schemes]
        x += [rounds(p["method"], p["k"], exact), p["rx"] / p["bps"]]
        rows.append(x)
        y.append((p["ms"] - p["noop"]) / 1000)
    coef, *_ = np.linalg.lstsq(np.array(rows), np.array(y), rcond=None)
    c = dict(zip(schemes, coef[: len(schemes)]))
    alpha, inv_eta = coef[len(schemes)], coef[len(schemes) + 1]
    n = pts[0]["params"]
    # bytes received per rank per step, a + b K, from gradsift's own counters (dense: exact)
    traffic = {}
    for m in schemes:
        if m == "allreduce":
            continue
        ks = np.array([p["k"] for p in pts if p["method"] == m and p["rate"] == "10gbit"], float)
        # the all-gather receives the other K - 1 fixed rows; the reductions count theirs
        bs = np.array([(p["k"] - 1) * p["row"] if m == "gs-topk" else p["received"]
                       for p in pts if p["method"] == m and p["rate"] == "10gbit"], float)
        b, a = np.polyfit(ks, bs, 1)
        traffic[m] = (float(a), float(b))
    for p in pts:
        if p["method"] == "noop":
            continue
        exact = 1.0 if p["method"] != "gs-topk-sparse-reuse" else 1.0 / 32
        pred = p["noop"] / 1000 + c[p["method"]] + alpha * rounds(p["method"], p["k"], exact) + inv_eta * p["rx"] / p["bps"]
        p["pred_ms"] = 1000 * pred
    return dict(c=c, alpha=float(alpha), eta=float(1 / inv_eta) if inv_eta > 0 else float("inf"), traffic=traffic, n=n,
                t0=min(p["noop"] for p in pts if p["k"] == 2) / 1000)


def bytes_model(model: dict, m: str, k: int) -> float:
    if m == "allreduce":
        return 2 * (k - 1) / k * 4 * model["n"]
    a, b = model["traffic"][m]
    return a + b * k


def predict(model: dict, m: str, k: int, bps: float) -> float:
    exact = 1.0 if m != "gs-topk-sparse-reuse" else 1.0 / 32
    return model["t0"] + model["c"][m] + model["alpha"] * rounds(m, k, exact) + bytes_model(model, m, k) / (model["eta"] * bps)


def report(pts: list[dict], model: dict, meta: str) -> str:
    out = [meta, "", f"Fitted: alpha = {1e6 * model['alpha']:.1f} us per message round, bandwidth efficiency eta = {model['eta']:.2f}, "
           "compute beyond the noop step c_m = " + ", ".join(f"{LABEL[m]} {1000 * v:.1f} ms" for m, v in model["c"].items())
           + f"; step without communication T_0 = {1000 * model['t0']:.1f} ms (noop_hook, K = 2). Bytes received per rank per step "
           "(gradsift's counters, fitted a + b K): " + ", ".join(f"{LABEL[m]} {a:,.0f} + {b:,.0f} K" for m, (a, b) in model["traffic"].items())
           + f"; dense 2 (K-1)/K 4n, n = {model['n']:,}.", "",
           "**The fit on the measured points** (wide MLP; median ms per step measured / modelled, error):", "",
           "| scheme | " + " | ".join(f"K = {k}, {r}" for k in KS for r in RATES) + " |",
           "|---" * (1 + len(KS) * len(RATES)) + "|"]
    errs = []
    for m in [m for m in METHODS if m != "noop"]:
        cells = []
        for k in KS:
            for r in RATES:
                p = next(p for p in pts if p["method"] == m and p["k"] == k and p["rate"] == r)
                e = (p["pred_ms"] - p["ms"]) / p["ms"]
                errs.append(abs(e))
                cells.append(f"{p['ms']:.0f} / {p['pred_ms']:.0f} ({100 * e:+.0f}%)")
        out.append(f"| {LABEL[m]} | " + " | ".join(cells) + " |")
    out += ["", f"Mean absolute error {100 * np.mean(errs):.0f}%, largest {100 * np.max(errs):.0f}%.", "",
            "**Predicted** (one rank per machine, T_0 and c_m as fitted; beyond K = 8 an extrapolation): "
            "bytes received per rank per step / ms per step", ""]
    kp = [2, 8, 64, 256, 1024]
    for gbit in (10, 100):
        out += [f"At {gbit} Gbit/s:", "", "| scheme | " + " | ".join(f"K = {k}" for k in kp) + " |", "|---" * (1 + len(kp)) + "|"]
        for m in [m for m in METHODS if m != "noop"]:
            cells = [f"{bytes_model(model, m, k) / 1e6:.2f} MB / {1000 * predict(model, m, k, gbit * 1e9 / 8):.0f} ms" for k in kp]
            out.append(f"| {LABEL[m]} | " + " | ".join(cells) + " |")
        out.append("")
    return "\n".join(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True)
    ap.add_argument("--steps", type=int, default=15)
    ap.add_argument("--warm", type=int, default=5)
    ap.add_argument("--fit-only", action="store_true")
    args = ap.parse_args()
    raw = os.path.join(args.out, "raw")
    if not args.fit_only:
        measure(raw, args.steps, args.warm)
        with open(os.path.join(raw, "meta.json"), "w") as f:
            json.dump(dict(commit=commit(), machine=machine(), date=subprocess.run(["date", "-u", "+%Y-%m-%d"], capture_output=True,
                                                                                text=True).stdout.strip()), f)
    with open(os.path.join(raw, "meta.json")) as f:
        meta = json.load(f)
    pts = load(raw)
    model = fit(pts)
    text = report(pts, model, f"Commit {meta['commit']}, {meta['machine']}, {meta['date']}; the wide MLP (784-4096-10), gloo, "
                              f"{args.steps} timed steps after {args.warm}; K > 2 oversubscribes the 2 cores.")
    with open(os.path.join(args.out, "model.md"), "w") as f:
        f.write(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
