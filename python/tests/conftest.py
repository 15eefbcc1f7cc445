import os
import signal
import socket
import sys
import time
import warnings

import pytest
import torch
import torch.multiprocessing as mp

sys.path.insert(0, os.path.dirname(__file__))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _exit_name(code: int | None) -> str:
    if code is not None and code < 0:
        try:
            return f"signal {signal.Signals(-code).name}"
        except ValueError:
            return f"signal {-code}"
    return f"exit code {code}"


@pytest.fixture
def run_ranks(tmp_path):
    """Runs `ddp_workers.worker` in `world` real processes on gloo (127.0.0.1) and returns
    each rank's result dict."""

    def run(world: int, case: dict, timeout: float = 240.0) -> list[dict]:
        import ddp_workers

        ctx = mp.start_processes(
            ddp_workers.worker,
            args=(world, free_port(), case, str(tmp_path)),
            nprocs=world,
            join=False,
            start_method="spawn",
        )
        files = [tmp_path / f"rank{r}.pt" for r in range(world)]
        deadline = time.monotonic() + timeout
        try:
            while any(p.is_alive() for p in ctx.processes):
                # a rank that died without its result: the others would wait on it for ever
                dead = [r for r, p in enumerate(ctx.processes) if p.exitcode not in (None, 0) and not files[r].exists()]
                if dead:
                    r = dead[0]
                    pytest.fail(f"rank {r} exited with {_exit_name(ctx.processes[r].exitcode)} before writing its result")
                if time.monotonic() > deadline:
                    pytest.fail(f"ranks did not finish within {timeout} s (a hang)")
                time.sleep(0.05)
        finally:
            for p in ctx.processes:
                if p.is_alive():
                    p.kill()
                p.join()
        for r, p in enumerate(ctx.processes):
            if not files[r].exists():
                pytest.fail(f"rank {r} exited with {_exit_name(p.exitcode)} without writing its result")
            if p.exitcode != 0:
                # after its result was written: in the teardown of torch.distributed (see
                # ddp_workers.worker), which the tests do not cover; said, not hidden
                warnings.warn(f"rank {r} exited with {_exit_name(p.exitcode)} after writing its result")
        out = [torch.load(f, weights_only=False) for f in files]
        for r, o in enumerate(out):
            assert "crash" not in o, f"rank {r} crashed:\n{o['crash']}"
        return out

    return run
