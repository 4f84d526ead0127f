"""After a SyncBatchNormError for a timeout or a lost peer, the process exits promptly.

Two real processes (gloo over 127.0.0.1, file rendezvous) with the group's own
timeout at 300 s and ``SYNCBN_TIMEOUT=2``. Rank 1 stops taking part (it sleeps,
alive) or dies; rank 0 gets the error, prints it and returns from its script
normally. Without the fix the interpreter's exit waited for the pending gloo
work (until the peer left or the 300 s passed); measured in
``docs/reliability.md``.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

GROUP_TIMEOUT_S = 300
SYNCBN_TIMEOUT_S = 2
EXIT_LIMIT_S = 10.0

RANK_SCRIPT = textwrap.dedent("""
    import os, sys, time
    from datetime import timedelta
    import torch, torch.distributed as dist
    import syncbn

    rank, init_file, fault = int(sys.argv[1]), sys.argv[2], sys.argv[3]
    dist.init_process_group("gloo", init_method="file://" + init_file, rank=rank,
                            world_size=2, timeout=timedelta(seconds={group_timeout}))
    layer = syncbn.SyncBatchNorm(3)
    layer(torch.randn(4, 3)).sum().backward()  # one good step
    dist.barrier()
    if rank == 1:
        print("stalled" if fault == "stall" else "dying", flush=True)
        if fault == "die":
            os._exit(3)
        time.sleep(120)  # alive, never joins the next collective
        os._exit(0)
    time.sleep(0.5)
    try:
        layer(torch.randn(4, 3))
    except syncbn.SyncBatchNormError as error:
        print("ERROR", time.time(), error, flush=True)
    else:
        print("NO ERROR", flush=True)
""").replace("{group_timeout}", str(GROUP_TIMEOUT_S))


@pytest.mark.parametrize("fault", ["stall", "die"])
def test_process_exits_promptly_after_the_error(fault: str, tmp_path: Path,
                                                record_property: object) -> None:
    script = tmp_path / "rank.py"
    script.write_text(RANK_SCRIPT)
    init_file = tmp_path / "rendezvous"
    env = {**os.environ, "SYNCBN_TIMEOUT": str(SYNCBN_TIMEOUT_S), "GLOO_SOCKET_IFNAME": "lo",
           "OMP_NUM_THREADS": "1"}
    procs = [subprocess.Popen([sys.executable, str(script), str(rank), str(init_file), fault],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              env=env)
             for rank in range(2)]
    try:
        out, err = procs[0].communicate(timeout=120)
        exited = time.time()
        assert "ERROR" in out, out + err
        line = next(x for x in out.splitlines() if x.startswith("ERROR"))
        errored = float(line.split()[1])
        assert "SyncBatchNorm(3) (forward" in line, line
        if fault == "stall":
            assert f"did not complete within {SYNCBN_TIMEOUT_S:g} s" in line, line
        assert "the process group was aborted" in line, line
        assert procs[0].returncode == 0, err
        exit_s = exited - errored
        record_property("exit_after_error_s", round(exit_s, 3))
        assert exit_s <= EXIT_LIMIT_S, f"exited {exit_s:.1f} s after the error"
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
            proc.communicate()
