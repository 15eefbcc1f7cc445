import os
import socket
import sys

import pytest
import torch
import torch.multiprocessing as mp

sys.path.insert(0, os.path.dirname(__file__))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


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
        import time

        deadline = time.monotonic() + timeout
        while not ctx.join(timeout=max(1.0, deadline - time.monotonic())):
            if time.monotonic() > deadline:
                for p in ctx.processes:
                    p.kill()
                pytest.fail(f"ranks did not finish within {timeout} s (a hang)")
        out = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(world)]
        for r, o in enumerate(out):
            assert "crash" not in o, f"rank {r} crashed:\n{o['crash']}"
        return out

    return run
