"""A training script with syncbn layers ends with exit code 0, every time (and what keeps
work handles alive for that: the exit wait's condition, the join channel's unread messages).

Two gloo processes (127.0.0.1, file rendezvous) train a chain of SyncBatchNorm
layers and a chain of local BatchNorms whose forward and backward call a bare
``dist.all_reduce`` (the bench's floor; DDP's gradient buckets are such
collectives too), destroy the group and end. A collective started in
``backward`` holds the Python context torch (2.13) stashes for the autograd
engine; when gloo's worker thread freed such a collective's handle while the
interpreter was shutting down it had to take the GIL there, was ended by
``pthread_exit``, and the process died of SIGABRT ("terminate called without an
active exception", exit −6): this test failed 3 times in 3 without syncbn's exit
handler (``_comm._let_workers_finish``), which gives those threads the GIL for a
moment first. See ``docs/reliability.md``.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

RUNS = 5

SCRIPT = textwrap.dedent("""
    import sys
    import torch, torch.distributed as dist
    import syncbn
    from syncbn.cli.bench import FloorBatchNorm  # local BN inside two bare all-reduces

    rank, init_file = int(sys.argv[1]), sys.argv[2]
    dist.init_process_group("gloo", init_method="file://" + init_file, rank=rank, world_size=2)
    torch.set_num_threads(1)
    x = torch.randn(32, 64, requires_grad=True)
    dy = torch.randn(32, 64)
    nets = [torch.nn.Sequential(*[syncbn.SyncBatchNorm(64) for _ in range(16)]),
            torch.nn.Sequential(*[FloorBatchNorm(torch.nn.BatchNorm1d(64), 64, None)
                                  for _ in range(16)])]
    for net in nets * 2:
        dist.barrier()
        for _ in range(5):
            torch.autograd.grad(net(x), [x, *net.parameters()], dy)
    dist.destroy_process_group()
    print("DONE", flush=True)
""")


@pytest.mark.slow
def test_a_script_that_ends_after_backward_collectives_exits_0(tmp_path: Path) -> None:
    script = tmp_path / "train.py"
    script.write_text(SCRIPT)
    env = {**os.environ, "GLOO_SOCKET_IFNAME": "lo", "OMP_NUM_THREADS": "1"}
    for run in range(RUNS):
        init_file = tmp_path / f"rendezvous{run}"
        procs = [subprocess.Popen([sys.executable, str(script), str(rank), str(init_file)],
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                  env=env) for rank in range(2)]
        try:
            outputs = [proc.communicate(timeout=120) for proc in procs]
        finally:
            for proc in procs:
                if proc.poll() is None:
                    proc.kill()
                    proc.communicate()
        for rank, (proc, (out, err)) in enumerate(zip(procs, outputs, strict=True)):
            assert "DONE" in out, (run, rank, err[-2000:])
            assert proc.returncode == 0 and "terminate called" not in err, (
                run, rank, proc.returncode, err[-2000:])


def _run_one_rank(tmp_path: Path, code: str) -> subprocess.CompletedProcess[str]:
    """Run ``code`` as a script in a fresh process (``sys.argv[1]``: a rendezvous file for a
    one-rank gloo group); it must exit 0."""
    script = tmp_path / "one_rank.py"
    script.write_text(code)
    run = subprocess.run([sys.executable, str(script), str(tmp_path / "rendezvous")],
                         capture_output=True, text=True, timeout=120, check=False,
                         env={**os.environ, "GLOO_SOCKET_IFNAME": "lo"})
    assert run.returncode == 0, run.stderr[-2000:]
    return run


ONE_RANK_SCRIPT = textwrap.dedent("""
    import sys, time
    import torch, torch.distributed as dist
    import syncbn
    from syncbn import _comm

    dist.init_process_group("gloo", init_method="file://" + sys.argv[1], rank=0, world_size=1)
    model = torch.nn.parallel.DistributedDataParallel(
        syncbn.convert_sync_batchnorm(torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3),
                                                          torch.nn.BatchNorm2d(4))))
    model(torch.randn(2, 3, 8, 8)).sum().backward()  # DDP's bucket: a backward collective
    dist.destroy_process_group()
    slept = []
    sleep = time.sleep
    # recorded, and still slept: the wait is what keeps this very script from dying at exit
    time.sleep = lambda seconds: (slept.append(seconds), sleep(seconds))
    _comm._let_workers_finish()
    print("SLEPT", slept, flush=True)
""")


def test_the_exit_wait_covers_a_one_rank_group_destroyed_before_exit(tmp_path: Path) -> None:
    # README's quick start: a one-rank group runs no SyncBatchNorm collective, and the
    # script destroys its group, but DDP's backward collective ran: the handler must wait.
    # (Its crash is too rare to count here: once in a CI run on torch 2.14.1.)
    run = _run_one_rank(tmp_path, ONE_RANK_SCRIPT)
    assert "SLEPT [0.02]" in run.stdout, (run.stdout, run.stderr[-2000:])


CHANNEL_SCRIPT = textwrap.dedent("""
    import sys
    import torch, torch.distributed as dist
    from syncbn import _comm, _join

    dist.init_process_group("gloo", init_method="file://" + sys.argv[1], rank=0, world_size=1)
    kept = []
    _comm.keep_work = lambda *handles: kept.extend(handles)
    channel = _join._Channel(dist.group.WORLD, torch.device("cpu"), 0, "the layers' ranks")
    read = channel.post(0.0)
    channel.read(read, 5.0)  # read: _comm's wait holds or keeps it, the channel forgets it
    pending = [channel.post(0.0)[0], channel.post(_join._POISON)[0]]
    channel.abandon()
    print("KEPT", [any(h is w for h in kept) for w in pending], read[0] in kept,
          len(channel.unread), flush=True)
    dist.destroy_process_group()
""")


def test_a_channel_leaving_with_an_error_keeps_every_message_it_has_not_read(
        tmp_path: Path) -> None:
    # the join's control messages that were posted and never waited on (its poison message
    # above all) may stay pending for good: freed later on gloo's thread during the
    # interpreter's shutdown, they ended the process with SIGABRT (see _comm.keep_work);
    # the repeated fault test above no longer sees that once _comm's wait keeps what it
    # waited on, so this checks the channel's part directly
    run = _run_one_rank(tmp_path, CHANNEL_SCRIPT)
    assert "KEPT [True, True] False 0" in run.stdout, (run.stdout, run.stderr[-2000:])
