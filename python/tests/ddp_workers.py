"""Code run inside the real gloo processes of the tests (spawned by torch.multiprocessing)."""

from __future__ import annotations

import datetime
import faulthandler
import gc
import os
import sys
import time
import traceback

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

import gradsift
import gradsift.torch as gst

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16, "float64": torch.float64}


class FailAt:
    """A bucket's compressor whose host step (either form) raises at step ``at``: a failure that is not a
    NonFiniteError (a device error, say), injected into gradsift's own object, never into
    torch.distributed."""

    def __init__(self, comp, at: int) -> None:
        self._comp, self._at = comp, at

    def step(self, x, step, dtype=None):
        if step == self._at:
            raise gradsift.GradsiftError(f"injected failure at step {step}")
        return self._comp.step(x, step, dtype=dtype)

    def step_encode_into(self, x, step, out, dtype=None):  # the all-gather path's host step
        if step == self._at:
            raise gradsift.GradsiftError(f"injected failure at step {step}")
        return self._comp.step_encode_into(x, step, out, dtype=dtype)

    def __getattr__(self, name: str):
        return getattr(self._comp, name)


def make_model(dtype: torch.dtype) -> torch.nn.Module:
    torch.manual_seed(0)
    m = torch.nn.Sequential(torch.nn.Linear(12, 10), torch.nn.Tanh(), torch.nn.Linear(10, 4))
    return m.to(dtype)


def batch(rank: int, step: int, dtype: torch.dtype, nan: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1000 * rank + step)
    x = torch.randn(8, 12, generator=g).to(dtype)
    y = torch.randint(0, 4, (8,), generator=g)
    if nan:
        x[0, 0] = float("nan")
    return x, y


def train(rank: int, case: dict, steps: int, state_in: dict | None = None, start: int = 0, model_in=None):
    dtype = DTYPES[case.get("dtype", "float32")]
    device = torch.device(case.get("device", "cpu"))
    model = make_model(dtype)
    if model_in is not None:
        model.load_state_dict(model_in)
    model = model.to(device)
    # find_unused_parameters=True keeps DDP from rebuilding its buckets after the first
    # step, so the bucket layout is fixed (test_bucket_rebuild covers the rebuild).
    ddp = DDP(model, find_unused_parameters=not case.get("rebuild", False),
              device_ids=[device.index] if device.type == "cuda" else None)
    settings = dict(case.get("settings", {}))
    if case.get("rank_settings") and rank in case["rank_settings"]:
        settings.update(case["rank_settings"][rank])
    state = gst.GradsiftState(ddp, **settings, backend="cuda" if device.type == "cuda" else "cpu")
    if state_in is not None:
        state.load_state_dict(state_in)
    rec = []
    free_mem: list[int] = []

    def hook(st, bucket):
        names = tuple(st._names[id(p)] for p in bucket.parameters())
        inp = bucket.buffer().cpu().clone()
        if case.get("fail_step") is not None and rank == case.get("fail_rank"):
            b = st._bucket(bucket, bucket.buffer())
            if not isinstance(b.comp, FailAt):
                b.comp = FailAt(b.comp, case["fail_step"])

        # The hook's future completes once its all-gather has: record on it, as DDP waits.
        def record(fut):
            out = fut.value()
            rec.append((names, inp, out.cpu().clone()))
            if device.type == "cuda":
                torch.cuda.synchronize()
                free_mem.append(torch.cuda.mem_get_info(device)[0])
            return out

        return gst.gradsift_hook(st, bucket).then(record)

    ddp.register_comm_hook(state, hook)
    opt = torch.optim.SGD(ddp.parameters(), lr=0.1)
    errors = []
    saved = None
    bytes_per_step = []
    for t in range(start, start + steps):
        x, y = batch(rank, t, dtype, nan=(t == case.get("nan_step") and rank == case.get("nan_rank")))
        x, y = x.to(device), y.to(device)
        if t == case.get("stall_step") and rank == case.get("stall_rank"):
            time.sleep(case["stall_s"])  # a rank that stalls (a slow host, a debugger)
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(ddp(x).float(), y)
        try:
            loss.backward()
        except Exception as e:  # noqa: BLE001 - the test inspects what each rank raised
            errors.append((t, type(e).__name__, str(e)))
            saved = {k: v.clone() for k, v in state.state_dict()["residual"].items()}
            if case.get("after_error"):
                # what the state does with a later step: DDP would not run one (its reducer
                # expects the failed reduction to finish), so the hook's job directly
                b = next(iter(state._buckets.values()))
                try:
                    gst._reduce(state, b, torch.zeros(sum(b.sizes), dtype=dtype), b.steps)
                except Exception as e2:  # noqa: BLE001
                    errors.append((t + 1, type(e2).__name__, str(e2)))
            break
        opt.step()
        bytes_per_step.append((state.bytes_sent, state.bytes_padded, state.bytes_received))
        if case.get("save_at") == t + 1:
            saved = (state.state_dict(), {k: v.clone() for k, v in model.state_dict().items()})
    params = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
    final_residual = {k: v.clone() for k, v in state.state_dict()["residual"].items()}
    return dict(free_mem=free_mem, final_residual=final_residual, rec=rec, errors=errors, params=params, saved=saved, state=state, bytes=bytes_per_step)


def words(rank: int, n: int):
    """Rank ``rank``'s ``n`` u32 words for the all-reduce test; near 2^32, so sums wrap."""
    import numpy as np

    return ((np.arange(n, dtype=np.uint64) * 2654435761 + (rank + 1) * 0xFFFF_FFF0) % 2**32).astype("<u4")


def piece(rank: int, call: int) -> bytes:
    """Rank ``rank``'s bytes for all-gather call ``call`` of the transport test (some empty)."""
    return bytes([rank, call]) * ((rank * 3 + call) % 4)


def run_case(rank: int, world: int, port: int, case: dict) -> dict:
    """One rank's part of ``case``: its result dict (what the tests compare)."""
    result: dict = {}
    if case.get("no_init"):
        try:
            gst.GradsiftState(torch.nn.Linear(2, 2))
        except Exception as e:  # noqa: BLE001
            result["errors"] = [(0, type(e).__name__, str(e))]
        return result
    if case.get("device", "cpu").startswith("cuda"):
        torch.cuda.set_device(torch.device(case["device"]))
    addr = os.environ.get("MASTER_ADDR", "127.0.0.1") if case.get("cluster") else "127.0.0.1"
    # pg_timeout: the model's group's timeout in seconds (what bounds the all-gather path)
    pg_timeout = {"timeout": datetime.timedelta(seconds=case["pg_timeout"])} if case.get("pg_timeout") else {}
    dist.init_process_group(
        case.get("pg", "gloo"), init_method=f"tcp://{addr}:{port}", rank=rank, world_size=world, **pg_timeout
    )
    if case.get("sum_words"):
        # The reductions' integer all-reduce on its own (recursive doubling over gloo).
        t = gst._TorchTransport(dist.group.WORLD)
        result["sums"] = [t.all_reduce_sum(words(rank, n).tobytes()) for n in case["sum_words"]]
        result["gathered"] = [t.all_gather(piece(rank, i)) for i in range(3)]
        return result
    steps = case.get("steps", 6)
    r = train(rank, case, steps)
    result = {k: v for k, v in r.items() if k != "state"}
    if case.get("resume"):
        # Second run: the first `save_at` steps, then a fresh model and state restored
        # from the saved state_dicts for the remaining steps.
        sd, model_sd = r["saved"]
        r2 = train(rank, case, steps - case["save_at"], state_in=sd, start=case["save_at"], model_in=model_sd)
        result["resumed_params"] = r2["params"]
        result["resumed_rec"] = r2["rec"]
    if not (case.get("pg_timeout") and result.get("errors")):  # a failed model group has no barrier
        dist.barrier()
    return result


def worker(rank: int, world: int, port: int, case: dict, outdir: str) -> None:
    """Runs ``case`` on this rank and writes ``rank{rank}.pt`` (atomically: a file that is
    there is whole), then leaves without interpreter finalization (see below)."""
    faulthandler.enable(all_threads=True)  # an abort prints every thread's Python stack
    try:
        result = run_case(rank, world, port, case)
    except Exception:  # noqa: BLE001
        result = {"crash": traceback.format_exc()}
    path = os.path.join(outdir, f"rank{rank}.pt")
    torch.save(result, path + ".part")
    os.replace(path + ".part", path)
    # torch.distributed's gloo teardown can abort a process at interpreter exit (SIGABRT,
    # "terminate called without an active exception", after the work is done: compare
    # pytorch/pytorch#179291). So the state, DDP and the groups go down here, while the
    # interpreter is whole, and the process exits without finalizing it; a rank that still
    # dies by a signal is reported by conftest.run_ranks with whether its result was written.
    result = None
    gc.collect()
    if dist.is_initialized():
        dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


if __name__ == "__main__":
    # One rank of a run on the namespace cluster (scripts/netbench/cluster.sh sets RANK,
    # WORLD_SIZE, MASTER_ADDR, MASTER_PORT): python ddp_workers.py CASE.pt OUTDIR
    case_in, outdir = sys.argv[1], sys.argv[2]
    torch.set_num_threads(1)
    case = dict(torch.load(case_in, weights_only=False), cluster=True)
    worker(int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ["MASTER_PORT"]), case, outdir)
