"""The hook on real gloo processes against gradsift's in-process simulation of K workers."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import gradsift
from gradsift import Aggregator, Compressor, Reducer, host_view
from gradsift.torch import make_config, set_state

BITS = {torch.float32: torch.int32, torch.float16: torch.int16, torch.bfloat16: torch.int16}


def simulate(settings: dict, inputs: list[list[tuple]], world: int, dtype: torch.dtype) -> list[torch.Tensor]:
    """gradsift's own K workers in one process: K compressors (worker ids 0..K-1, the
    same step numbers, configs from the same settings) and one aggregator, on the bucket
    inputs each rank recorded. Returns the aggregated update of every step. When the bucket
    layout changes (DDP's rebuild after step 0) each worker's residual moves parameter by
    parameter into a plan for the new layout, as the hook does. Under ``reduce`` 'sparse'
    or 'shared-randomk' the K payloads go through a ``Reducer`` in process (re-planned when
    the layout or the configuration changes) and its refunds back to the K compressors."""
    outs = []
    reduce = settings.get("reduce", "allgather")
    reducer, planned = None, None
    comps: list[Compressor] = []
    names = None
    for t in range(len(inputs[0])):
        key = inputs[0][t][0]
        cfgs = [make_config(settings, t, w) for w in range(world)]
        if key != names:
            sizes = bucket_sizes(dtype, key)
            fresh = [Compressor(sizes, cfgs[w]) for w in range(world)]
            if comps:
                old_sizes = bucket_sizes(dtype, names)
                for w in range(world):
                    e, u = gradsift.residual(comps[w]), gradsift.momentum(comps[w])
                    split = lambda v: dict(zip(names, np.split(v, np.cumsum(old_sizes)[:-1]))) if v is not None else None
                    es, us = split(e), split(u)
                    e2 = np.concatenate([es[n] for n in key])
                    u2 = np.concatenate([us[n] for n in key]) if us else None
                    set_state(fresh[w], cfgs[w], e2, u2)
            comps, names = fresh, key
            agg = Aggregator(sizes, world, settings["mode"], settings["average"])
        payloads = []
        for w in range(world):
            assert inputs[w][t][0] == key
            if cfgs[w] != comps[w].config:
                comps[w].reconfigure(cfgs[w])
            a, hint = host_view(inputs[w][t][1])
            payloads.append(comps[w].step(a, t, dtype=hint))
        out = torch.empty_like(inputs[0][t][1])
        o, hint = host_view(out)
        if reduce == "allgather":
            agg.aggregate(payloads, o, dtype=hint)
        else:
            if planned != (key, cfgs[0]):
                reducer = Reducer(sizes, cfgs[0], world, reduce, settings["average"], settings["threshold_every"])
                planned = (key, cfgs[0])
            refunds, _, _ = reducer.reduce(payloads, t, o, dtype=hint)
            for w, back in enumerate(refunds):
                comps[w].refund(back)
        outs.append(out)
    return outs


def full_settings(case: dict) -> dict:
    s = dict(method="topk", ratio=0.01, r_ratio=None, mode="global", average="workers", momentum=0.0,
             values="float32", scale="none", seed=0, warmup_epochs=0, steps_per_epoch=0,
             reduce="allgather", threshold_every=1, levels=None, error_feedback=True)
    s.update(case["settings"])
    return s


def bucket_sizes(dtype: torch.dtype, names: tuple[str, ...]) -> list[int]:
    import ddp_workers

    model = dict(ddp_workers.make_model(dtype).named_parameters())
    return [model[n].numel() for n in names]


CASES = {
    "topk-dgc-warmup": dict(settings=dict(method="topk", ratio=0.05, momentum=0.9, warmup_epochs=2, steps_per_epoch=2), steps=7),
    "rtopk-per-layer-senders-bf16": dict(dtype="bfloat16", settings=dict(method="rtopk", ratio=0.1, r_ratio=0.3, mode="per_layer", average="senders", seed=7), steps=5),
    "randomk-unbiased-f16": dict(dtype="float16", settings=dict(method="randomk", ratio=0.1, scale="unbiased", seed=3, values="float16"), steps=5),
    "sign-per-layer": dict(settings=dict(method="sign", mode="per_layer", momentum=0.5), steps=4),
    # docs/SPEC.md §13: Philox-keyed rounding, so every rank rounds as the simulation does
    "qsgd-per-layer-momentum": dict(settings=dict(method="qsgd", levels=3, mode="per_layer", momentum=0.5, seed=11), steps=4),
    "qsgd-global-senders-f16": dict(dtype="float16", settings=dict(method="qsgd", levels=127, average="senders"), steps=3),
    "qsgd-without-error-feedback": dict(settings=dict(method="qsgd", levels=7, error_feedback=False, mode="per_layer"), steps=3),
    # DDP's default: buckets rebuilt after the first step; residuals move parameter by parameter
    "topk-bucket-rebuild": dict(settings=dict(method="topk", ratio=0.1, seed=1), steps=4, rebuild=True),
    # the reductions of docs/SPEC.md §12 through gloo's all-to-all and all-gather
    "sparse-topk-dgc-warmup-reuse": dict(settings=dict(method="topk", ratio=0.05, momentum=0.9, warmup_epochs=2, steps_per_epoch=2,
                                                       reduce="sparse", threshold_every=3), steps=8),
    "sparse-rtopk-per-layer-senders-bf16": dict(dtype="bfloat16", settings=dict(method="rtopk", ratio=0.1, r_ratio=0.3, mode="per_layer",
                                                                                average="senders", seed=7, reduce="sparse"), steps=5),
    "sparse-topk-bucket-rebuild-f16": dict(dtype="float16", settings=dict(method="topk", ratio=0.1, seed=1, reduce="sparse"), steps=4, rebuild=True),
    "shared-randomk-f32": dict(settings=dict(method="randomk", ratio=0.1, seed=3, reduce="shared-randomk"), steps=5),
}


@pytest.mark.parametrize("world", [2, 5, 6])
def test_the_transports_log_round_collectives(run_ranks, world):
    """The reductions' transport over gloo point-to-point: the selection's integer
    all-reduce (SPEC §12, recursive doubling) gives every rank the wrapping sum of every
    rank's words, and the all-gather (Bruck) every rank's bytes in rank order, for K a power
    of two and not (K = 5: one rank folded in; K = 6: two), empty pieces included."""
    import ddp_workers

    lengths = [256, 3, 0, 256 * 64]
    res = run_ranks(world, dict(sum_words=lengths), timeout=120.0)
    for i, n in enumerate(lengths):
        want = sum(ddp_workers.words(r, n).astype(np.uint64) for r in range(world)) % 2**32
        for rank, r in enumerate(res):
            got = np.frombuffer(r["sums"][i], dtype="<u4")
            assert np.array_equal(got, want.astype(np.uint32)), (rank, n)
    for call in range(3):
        want = [ddp_workers.piece(w, call) for w in range(world)]
        for rank, r in enumerate(res):
            assert r["gathered"][call] == want, (rank, call)


@pytest.mark.parametrize(
    "kind,cfg,every",
    [
        ("sparse", dict(method="topk", ratio=0.05), 1),
        ("sparse", dict(method="rtopk", ratio=0.05, r_ratio=0.2, mode="per_layer"), 3),
        ("shared-randomk", dict(method="randomk", ratio=0.1), 1),
    ],
)
def test_reduce_entries_equals_reduce(kind, cfg, every):
    """The update as entries (what CUDA buckets scatter on the device) is the dense update's
    nonzero pattern, ascending, with the same bits; the refunds are the same."""
    sizes, world = [300, 7, 200], 3
    n = sum(sizes)
    shared = kind == "shared-randomk"
    comps = [Compressor(sizes, gradsift.Config(**cfg, seed=5, worker=0 if shared else w)) for w in range(world)]
    dense = Reducer(sizes, comps[0].config, world, kind, "workers", every)
    entries = Reducer(sizes, comps[0].config, world, kind, "workers", every)
    idx = np.zeros(entries.max_entries, np.int32)
    val = np.zeros(entries.max_entries, np.float32)
    rng = np.random.default_rng(1)
    for t in range(6):
        ps = [c.step(rng.standard_normal(n).astype(np.float32), t) for c in comps]
        out = np.full(n, 9.0, np.float32)
        refunds, sent, received = dense.reduce(ps, t, out)
        c, refunds2, sent2, received2 = entries.reduce_entries(ps, t, idx, val)
        assert (sent, received) == (sent2, received2)
        assert [(p.indices, p.values) for p in refunds] == [(p.indices, p.values) for p in refunds2]
        assert np.all(np.diff(idx[:c]) > 0), "entries ascending"
        rebuilt = np.zeros(n, np.float32)
        rebuilt[idx[:c]] = val[:c]
        assert np.array_equal(rebuilt.view(np.int32), out.view(np.int32)), f"step {t}"
        assert c >= np.count_nonzero(out) and c > 0
        for comp, back in zip(comps, refunds):
            comp.refund(back)


@pytest.mark.parametrize("world", [2, 3])
@pytest.mark.parametrize("name", list(CASES))
def test_hook_equals_simulation(run_ranks, world, name):
    case = CASES[name]
    res = run_ranks(world, case)
    dtype = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}[case.get("dtype", "float32")]
    for r in res:
        assert not r["errors"], r["errors"]
        assert len(r["rec"]) == case["steps"]
    settings = full_settings(case)
    sim = simulate(settings, [r["rec"] for r in res], world, dtype)
    for t, expect in enumerate(sim):
        for rank, r in enumerate(res):
            got = r["rec"][t][2]
            assert got.dtype == dtype
            assert torch.equal(got.view(BITS[dtype]), expect.view(BITS[dtype])), f"step {t}, rank {rank}: hook != simulation"
    # and the ranks' models stayed identical, bit for bit
    for r in res[1:]:
        for k, v in r["params"].items():
            assert torch.equal(v.view(BITS[dtype]), res[0]["params"][k].view(BITS[dtype])), k
    # traffic: a sparse message is far below the dense bucket
    n = sum(bucket_sizes(dtype, res[0]["rec"][0][0]))
    sent, padded, received = res[0]["bytes"][-1]
    assert 0 < sent <= padded
    if case["settings"]["method"] != "sign":
        assert sent < n * dtype.itemsize
    if case["settings"]["method"] == "qsgd":
        # the wire's exact length: a code of 1 + ceil(log2(s + 1)) bits per element
        bits = 1 + int(case["settings"]["levels"]).bit_length()
        assert sent >= n * bits // 8
    # the reductions count what a rank received from the others; the all-gather does not
    assert (received > 0) == (case["settings"].get("reduce", "allgather") != "allgather")


def test_resume_loses_no_error_feedback(run_ranks):
    """Save after 3 steps, restore into a fresh model and state, run 3 more: the same
    updates, bit for bit, as the uninterrupted run (residuals restored exactly)."""
    case = dict(settings=dict(method="topk", ratio=0.05), steps=6, save_at=3, resume=True)
    res = run_ranks(2, case)
    for r in res:
        assert not r["errors"]
        for t, (a, b) in enumerate(zip(r["rec"][3:], r["resumed_rec"])):
            assert torch.equal(a[1], b[1]), f"input of step {t + 3} differs"
            assert torch.equal(a[2], b[2]), f"update of step {t + 3} differs"
        for k, v in r["params"].items():
            assert torch.equal(v, r["resumed_params"][k]), k
        sd = r["saved"][0]
        assert set(sd["residual"]) == {"0.weight", "0.bias", "2.weight", "2.bias"}
        assert any(t.abs().sum() > 0 for t in sd["residual"].values())


def test_resume_with_momentum_close(run_ranks):
    """With DGC momentum the residual and momentum are restored by replay (to f32
    rounding): the resumed run tracks the uninterrupted one closely."""
    case = dict(settings=dict(method="topk", ratio=0.1, momentum=0.9), steps=5, save_at=2, resume=True)
    res = run_ranks(2, case)
    for r in res:
        for k, v in r["params"].items():
            assert torch.allclose(v, r["resumed_params"][k], atol=1e-5), k
