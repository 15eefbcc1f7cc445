"""Bad input: float64 and non-contiguous arrays, ranks configured differently, a
non-finite gradient on one rank, a failed or stalled rank, no process group."""

from __future__ import annotations

import datetime
import re

import numpy as np
import pytest
import torch
import torch.distributed as dist
from conftest import free_port

import gradsift
from gradsift import Compressor, Config, host_view


def test_float64_and_noncontiguous_rejected_without_copy():
    c = Compressor([6], Config("topk", 0.5))
    with pytest.raises(TypeError, match="float64"):
        c.step(np.zeros(6), 0)
    with pytest.raises(ValueError, match="contiguous"):
        c.step(np.zeros(12, np.float32)[::2], 0)
    with pytest.raises(TypeError, match="float64"):
        host_view(torch.zeros(6, dtype=torch.float64))
    with pytest.raises(ValueError, match="contiguous"):
        host_view(torch.zeros(6, 2)[:, 0])
    with pytest.raises(ValueError, match="expected 6 elements"):
        c.step(np.zeros(5, np.float32), 0)


def test_zero_copy_reads_the_tensor_in_place():
    t = torch.tensor([0.0, 5.0, -1.0, 0.5])
    c = Compressor([4], Config("topk", 0.25))
    x, _ = host_view(t)
    assert x.__array_interface__["data"][0] == t.data_ptr()  # a view, not a copy
    assert c.step(x, 0).indices == [1]


def test_nonfinite_keeps_residual_direct():
    c = Compressor([3], Config("topk", k=1))
    c.step(np.array([1.0, 2.0, 3.0], np.float32), 0)
    before = gradsift.residual(c)
    with pytest.raises(gradsift.NonFiniteError):
        c.step(np.array([np.inf, 0, 0], np.float32), 1)
    assert np.array_equal(gradsift.residual(c), before)


def test_no_process_group(run_ranks):
    res = run_ranks(1, dict(no_init=True))
    (_, kind, msg), = res[0]["errors"]
    assert kind == "RuntimeError" and "init_process_group" in msg


def test_float64_model_clear_error(run_ranks):
    res = run_ranks(2, dict(dtype="float64", settings=dict(method="topk", ratio=0.1), steps=2))
    for r in res:
        (_, _, msg), = r["errors"]
        assert "float64" in msg and "float32, float16 or bfloat16" in msg


@pytest.mark.parametrize("world", [2, 3])
def test_ranks_configured_differently(run_ranks, world):
    case = dict(settings=dict(method="topk", ratio=0.1), rank_settings={world - 1: dict(ratio=0.2)}, steps=2)
    res = run_ranks(world, case)
    for r in res:
        assert len(r["errors"]) == 1, "every rank raises, on the first call"
        t, _, msg = r["errors"][0]
        assert t == 0 and "configured differently" in msg and "0.2" in msg


@pytest.mark.parametrize("reduce", ["allgather", "sparse"])
@pytest.mark.parametrize("world", [2, 3])
def test_nonfinite_gradient_every_rank_raises_residual_kept(run_ranks, world, reduce):
    case = dict(settings=dict(method="topk", ratio=0.1, momentum=0.9, reduce=reduce), steps=4, nan_step=2, nan_rank=1)
    res = run_ranks(world, case)
    msgs = set()
    for r in res:
        (t, _, msg), = r["errors"]
        assert t == 2 and "non-finite gradient on rank(s) [1]" in msg
        # DDP wraps the callback's error with the Python stack it ran on, which differs
        # between ranks (the callback runs inline on a rank whose collective had already
        # finished): compare gradsift's own message.
        m = re.search(r"NonFiniteError: (gradsift hook: .*?no update was applied)", msg)
        assert m, msg
        msgs.add(m[1])
        assert len(r["rec"]) == 2  # steps 0 and 1 applied, step 2 not
    assert len(msgs) == 1, "every rank raises the same error"
    # every rank's residual after the rejected step is, bit for bit, the one a clean run
    # has after steps 0 and 1
    clean = run_ranks(world, dict(case, nan_step=None, steps=2))
    for r, c in zip(res, clean):
        assert set(r["saved"]) == set(c["final_residual"])
        for k, v in r["saved"].items():
            assert torch.equal(v, c["final_residual"][k]), k


@pytest.mark.parametrize("world,reduce", [(2, "sparse"), (3, "sparse"), (3, "allgather")])
def test_a_failed_step_stops_every_rank_under_the_reductions(run_ranks, world, reduce):
    """A rank whose step fails with an error other than non-finite (injected into its
    compressor) still takes part in the status all-gather (the reductions) or sends its row
    marked failed (the all-gather path): it raises its own error, every other rank a
    GradsiftError naming it (instead of waiting in the collective for ever), and every rank
    keeps the residual of the steps before."""
    case = dict(settings=dict(method="topk", ratio=0.1, momentum=0.9, reduce=reduce), steps=4, fail_step=2, fail_rank=1)
    res = run_ranks(world, case, timeout=120.0)
    for rank, r in enumerate(res):
        assert "crash" not in r, r.get("crash")
        (t, _, msg), = r["errors"]
        assert t == 2, msg
        want = "injected failure at step 2" if rank == 1 else "step 2 failed on rank(s) [1]"
        assert want in msg, msg
        assert len(r["rec"]) == 2  # steps 0 and 1 applied, step 2 not
    clean = run_ranks(world, dict(case, fail_step=None, steps=2))
    for r, c in zip(res, clean):
        for k, v in r["saved"].items():
            assert torch.equal(v, c["final_residual"][k]), k


def test_a_stalled_rank_times_out_the_others_residual_kept(run_ranks):
    """timeout= bounds each collective of the reductions' group: with rank 2 asleep at step
    2 for longer, ranks 0 and 1 raise CollectiveError within it instead of waiting 30
    minutes, rank 2 raises one when it wakes (its peers closed the group), a later step
    raises at once without compressing, and every rank keeps the residual of steps 0, 1."""
    settings = dict(method="topk", ratio=0.1, momentum=0.9, reduce="sparse", timeout=datetime.timedelta(seconds=3))
    case = dict(settings=settings, steps=4, stall_step=2, stall_rank=2, stall_s=10, after_error=True)
    res = run_ranks(3, case, timeout=120.0)
    for rank, r in enumerate(res):
        (t, kind, msg), (t2, kind2, msg2) = r["errors"]
        assert t == 2 and "CollectiveError" in msg and "a collective of the reductions' group failed" in msg, msg
        assert "no update was applied" in msg, msg
        # the bucket's step count stays at the failed step's
        assert kind2 == "CollectiveError" and "step 2 not run" in msg2 and "failed at step 2" in msg2, msg2
        assert len(r["rec"]) == 2
    # a rank that waited timed out (the other may instead see its peer close the group)
    assert any("Timed out" in r["errors"][0][2] for r in res[:2]), [r["errors"][0][2] for r in res]
    clean = run_ranks(3, dict(case, stall_step=None, after_error=False, steps=2))
    for r, c in zip(res, clean):
        for got in (r["saved"], r["final_residual"]):
            assert set(got) == set(c["final_residual"])
            for k, v in got.items():
                assert torch.equal(v, c["final_residual"][k]), k


def test_a_stalled_rank_times_out_the_allgather_residual_kept(run_ranks):
    """Under reduce='allgather' the hook's all-gather runs on the model's group, whose
    ``init_process_group(timeout=)`` bounds it: with rank 2 asleep at step 2 for longer, the
    ranks that wait raise CollectiveError (not gloo's bare RuntimeError), and every rank
    keeps the residual of steps 0 and 1."""
    settings = dict(method="topk", ratio=0.1, momentum=0.9)
    case = dict(settings=settings, steps=4, stall_step=2, stall_rank=2, stall_s=10, pg_timeout=3)
    res = run_ranks(3, case, timeout=120.0)
    for r in res[:2]:
        (t, _, msg), = r["errors"]
        assert t == 2 and "CollectiveError" in msg and "the all-gather of the model's process group failed" in msg, msg
        assert "no update was applied" in msg, msg
        assert len(r["rec"]) == 2
    assert any("Timed out" in r["errors"][0][2] for r in res[:2]), [r["errors"][0][2] for r in res]
    assert [t for t, _, _ in res[2]["errors"]] == [2], res[2]["errors"]  # it meets its closed peers
    clean = run_ranks(3, dict(case, stall_step=None, steps=2))
    for r, c in zip(res, clean):
        assert set(r["saved"]) == set(c["final_residual"])
        for k, v in r["saved"].items():
            assert torch.equal(v, c["final_residual"][k]), k


def test_timeout_is_checked():
    """Bad timeouts are ValueErrors at construction (needs no peers: a world of one)."""
    import gradsift.torch as gst

    if not dist.is_initialized():
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
    try:
        m = torch.nn.Linear(2, 2)
        for bad in (datetime.timedelta(0), datetime.timedelta(seconds=-1), 5):
            with pytest.raises(ValueError, match="timeout="):
                gst.GradsiftState(m, reduce="sparse", timeout=bad)
        with pytest.raises(ValueError, match="init_process_group"):
            gst.GradsiftState(m, timeout=datetime.timedelta(seconds=1))
        st = gst.GradsiftState(m, reduce="sparse", timeout=datetime.timedelta(seconds=1))
        assert st.timeout == datetime.timedelta(seconds=1)
    finally:
        dist.destroy_process_group()


def test_method_names_come_from_the_one_table():
    """gradsift.MethodKind's names (the Rust table the CLI reads too) are what Config takes
    and reports; another name is a ValueError listing them."""
    for name in ["topk", "randomk", "rtopk", "sign", "qsgd"]:
        if name == "rtopk":
            cfg = Config(name, 0.1, r_ratio=0.2)
        elif name == "qsgd":
            cfg = Config(name, levels=3)
        else:
            cfg = Config(name, None if name == "sign" else 0.1)
        assert cfg.method == name
    with pytest.raises(ValueError, match="method must be one of 'topk', 'randomk', 'rtopk', 'sign', 'qsgd', got \"powersgd\""):
        Config("powersgd", 0.1)


def test_qsgd_from_python():
    """QSGD (SPEC §13) through the bindings: levels are required and checked, a step sends
    one signed level per element within them, and a QSGD plan has nothing to refund."""
    with pytest.raises(ValueError, match="qsgd needs levels"):
        Config("qsgd")
    with pytest.raises(ValueError, match="levels"):
        Compressor([4], Config("qsgd", levels=0))
    c = Compressor([5, 3], Config("qsgd", levels=2, mode="per-layer"))
    p = c.step(np.array([1.0, -2.0, 0.5, 0.0, 4.0, -1.0, 0.25, 0.0], np.float32), 0)
    assert p.kind == "qsgd" and len(p.codes) == 8 and len(p.scales) == 2
    assert p.scales == [4.0, 1.0]
    assert all(-2 <= q <= 2 for q in p.codes)
    assert p.codes[4] == 2 and p.codes[5] == -2 and p.codes[3] == 0
    with pytest.raises(TypeError, match="sparse payload"):
        c.refund(p)
    # Without error feedback the residual stays 0; the option is QSGD's alone.
    plain = Compressor([5, 3], Config("qsgd", levels=2, mode="per-layer", error_feedback=False))
    assert plain.step(np.array([1.0, -2.0, 0.5, 0.0, 4.0, -1.0, 0.25, 0.0], np.float32), 0).codes == p.codes
    assert not gradsift.residual(plain).any() and gradsift.residual(c).any()
    with pytest.raises(ValueError, match="error_feedback=False is QSGD's option"):
        Config("topk", 0.1, error_feedback=False)
    with pytest.raises(ValueError, match="momentum"):
        Compressor([4], Config("qsgd", levels=2, momentum=0.5, error_feedback=False))


def test_reducer_bad_inputs_are_typed_errors():
    from gradsift import Payload, Reducer

    cfg = Config("topk", k=1)
    with pytest.raises(ValueError, match="unknown reduction"):
        Reducer([4], cfg, 2, "ring")
    with pytest.raises(ValueError, match="shared-randomk needs method 'randomk'"):
        Reducer([4], cfg, 2, "shared-randomk")
    with pytest.raises(ValueError, match="sparse method"):
        Reducer([4], Config("sign"), 2, "sparse")
    r = Reducer([4], cfg, 2, "sparse")
    out = np.full(4, 7.0, np.float32)
    good = Payload.sparse(4, [1], [2.0])
    with pytest.raises(ValueError, match="expected 4 elements"):
        r.reduce([good, good], 0, np.zeros(3, np.float32))
    with pytest.raises(TypeError, match="sparse payloads"):
        r.reduce([good, Payload.sign(4, [1.0], [0])], 0, out)
    with pytest.raises(ValueError):
        r.reduce([good], 0, out)  # one payload for K = 2 in process
    with pytest.raises(gradsift.GradsiftError):
        r.reduce([good, Payload.sparse(4, [9], [1.0])], 0, out)  # index out of range
    assert np.all(out == 7.0), "a failed reduction writes nothing"
    refunds, sent, received = r.reduce([good, Payload.sparse(4, [3], [-1.0])], 0, out)
    assert out.tolist() == [0.0, 1.0, 0.0, 0.0]  # the global top-1 of the mean
    assert [p.indices for p in refunds] == [[], [3]] and sent > 0 and received > 0
    # the update as entries (the CUDA buckets' form): arrays of max_entries, typed errors
    assert r.max_entries == 2  # K * k, at most n
    idx, val = np.full(2, -1, np.int32), np.full(2, 7.0, np.float32)
    with pytest.raises(ValueError, match="max_entries"):
        r.reduce_entries([good, good], 0, idx[:1], val)
    with pytest.raises(TypeError, match="int32"):
        r.reduce_entries([good, good], 0, idx.astype(np.int64), val)
    with pytest.raises(TypeError, match="float32"):
        r.reduce_entries([good, good], 0, idx, val.astype(np.float16))
    with pytest.raises(gradsift.GradsiftError):
        r.reduce_entries([good, Payload.sparse(4, [9], [1.0])], 0, idx, val)
    assert idx.tolist() == [-1, -1] and val.tolist() == [7.0, 7.0], "a failed reduction writes nothing"
    c = Compressor([4], Config("topk", k=2))
    with pytest.raises(ValueError, match="no step"):
        c.refund(Payload.sparse(4, [3], [1.0]))  # nothing sent yet
    c.step(np.array([0, 0, 0, -1], np.float32), 0)  # sends -1 and the first 0
    with pytest.raises(gradsift.GradsiftError, match="more than the 2"):
        c.refund(Payload.sparse(4, [0, 1, 3], [1.0, 1.0, 1.0]))
    with pytest.raises(gradsift.GradsiftError, match="strictly ascending"):
        c.refund(Payload.sparse(4, [3, 2], [1.0, 1.0]))
    with pytest.raises(gradsift.GradsiftError, match="elements"):
        c.refund(Payload.sparse(5, [3], [1.0]))
    before = gradsift.residual(c)
    c.refund(refunds[1])
    assert gradsift.residual(c).tolist() == [0, 0, 0, -1] and before.tolist() == [0, 0, 0, 0]


def test_hook_signature_accepted_by_ddp():
    """DDP checks the hook's annotations: GradBucket in, Future[Tensor] out."""
    import inspect

    import torch.distributed as dist

    import gradsift.torch as gst

    sig = inspect.signature(gst.gradsift_hook)
    assert sig.parameters["bucket"].annotation is dist.GradBucket
    assert sig.return_annotation == torch.futures.Future[torch.Tensor]
