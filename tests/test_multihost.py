"""Two test hosts: Linux network namespaces joined by a veth pair, ``torchrun`` on each.

Each test builds two namespaces (``syncbn-mh-<pid>-<n>-h0`` / ``-h1``), a veth
pair between them (``sbnveth0`` at 10.213.0.1 in host 0, ``sbnveth1`` at
10.213.0.2 in host 1) and brings ``lo`` up in each. Then
``torchrun --nnodes 2 --nproc-per-node 2`` starts in each namespace with
``ip netns exec``: c10d rendezvous on host 0's veth address (host 0 serves the
store, ``is_host=1``), gloo bound to the veth with ``GLOO_SOCKET_IFNAME``,
``OMP_NUM_THREADS=1``. No traffic leaves the namespaces.

Checked: ``python -m syncbn check`` across the hosts (4 ranks); a short DDP
training run over both hosts equals the same run with 4 processes on one host,
bit for bit; and with the link cut mid-training (``ip link set sbnveth1 down``
after every rank has done 5 steps; ``SYNCBN_TIMEOUT=10``, the group's timeout
left at torch's 30 min, no DDP), every rank on both hosts raises
``SyncBatchNormError`` and ends within ``SYNCBN_TIMEOUT`` + 60 s, and host 0's
torchrun exits non-zero. Host 1's torchrun is not waited for: after the cut its
elastic agent blocks on the rendezvous store it can no longer reach, whatever
its ranks do (the teardown kills it).

Needs root and ``ip`` (skipped otherwise, with that reason). Whatever happens,
the teardown kills every process inside the namespaces (``ip netns pids``) and
deletes them; namespaces with this prefix left by a process that no longer
exists are deleted at start. Figures are recorded with ``record_property``
(``pytest tests/test_multihost.py --junitxml=multihost.xml -o junit_family=xunit1``).
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
TRAIN = ROOT / "tests" / "multihost" / "train.py"
PREFIX = "syncbn-mh-"
SUBNET = "10.213.0"
RDZV_PORT = 29400
START_S = 90.0
"""Wall-clock limit for a whole launch that should succeed (rendezvous, work, exit)."""
SYNCBN_TIMEOUT_S = 10
"""``SYNCBN_TIMEOUT`` of the partition tests; the group keeps torch's default (30 min)."""
STORE_AGENT_EXIT_S = 20.0
"""After its ranks have ended, host 0's torchrun (which serves the rendezvous store) must be
gone within this. Host 1's torchrun is not waited for: its keep-alive thread blocks on the
unreachable store (torch's elastic agent), long after its ranks have ended."""
EXIT_SLACK_S = 60.0
"""Every rank must be gone within ``SYNCBN_TIMEOUT_S`` + this after the link is cut."""

pytestmark = [
    pytest.mark.slow,
    pytest.mark.timeout(240),
    pytest.mark.skipif(not sys.platform.startswith("linux"), reason="needs Linux namespaces"),
    pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() != 0,
                       reason="needs root to create network namespaces"),
    pytest.mark.skipif(shutil.which("ip") is None, reason="needs the `ip` tool (iproute2)"),
]

_serial = itertools.count()


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["ip", *args], capture_output=True, text=True, check=check, timeout=30)


def _namespaces() -> list[str]:
    listed = _ip("netns", "list", check=False).stdout.splitlines()
    return [line.split()[0] for line in listed if line.strip()]


def _kill_namespace_processes(namespace: str) -> None:
    """SIGKILL every process whose network namespace is ``namespace``, and wait for them."""
    for _ in range(50):
        pids = [int(p) for p in _ip("netns", "pids", namespace, check=False).stdout.split()]
        if not pids:
            return
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        time.sleep(0.1)


def _delete_namespace(namespace: str) -> None:
    _kill_namespace_processes(namespace)
    _ip("netns", "delete", namespace, check=False)


def _alive(pid: int) -> bool:
    """True while ``pid`` runs (a zombie, waiting for its parent to reap it, has ended)."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return False
    state = next((line for line in status.splitlines() if line.startswith("State:")), "")
    return "Z" not in state.split()[1:2]


def _delete_stale_namespaces() -> None:
    """Delete namespaces of this prefix whose creating process (the pid in the name) is gone."""
    for namespace in _namespaces():
        if not namespace.startswith(PREFIX):
            continue
        owner = namespace.removeprefix(PREFIX).split("-")[0]
        if owner.isdigit() and not _alive(int(owner)):
            _delete_namespace(namespace)


@dataclass
class Host:
    """One namespace: its name, veth interface and address."""

    index: int
    namespace: str
    ifname: str
    addr: str


@dataclass
class Launch:
    """One ``torchrun`` started in a namespace, with its log files."""

    host: Host
    process: subprocess.Popen[bytes]
    stdout: Path
    stderr: Path
    started: float = field(default_factory=time.time)
    ended: float = 0.0

    def output(self) -> str:
        return self.stdout.read_text(errors="replace") + self.stderr.read_text(errors="replace")


@dataclass
class TwoHosts:
    """The two test hosts and everything started in them (killed and deleted at teardown)."""

    hosts: list[Host]
    workdir: Path
    launches: list[Launch] = field(default_factory=list)

    def torchrun(self, host: Host, args: Sequence[str], *, nnodes: int = 2, nproc: int = 2,
                 env: dict[str, str] | None = None, tag: str = "run") -> Launch:
        """Start ``torchrun`` inside ``host``'s namespace, rendezvous on host 0's veth address.

        With ``nnodes=1`` it is a single-host run over the loopback interface.
        """
        if nnodes == 1:
            rdzv = ["--rdzv-endpoint", f"127.0.0.1:{RDZV_PORT + 1}", "--local-addr", "127.0.0.1"]
            ifname = "lo"
        else:
            rdzv = ["--rdzv-endpoint", f"{self.hosts[0].addr}:{RDZV_PORT}",
                    "--rdzv-conf", f"is_host={int(host.index == 0)}",
                    "--local-addr", host.addr]
            ifname = host.ifname
        command = [
            "ip", "netns", "exec", host.namespace,
            sys.executable, "-m", "torch.distributed.run",
            "--nnodes", str(nnodes), "--nproc-per-node", str(nproc),
            "--rdzv-backend", "c10d", "--rdzv-id", f"{tag}-{os.getpid()}", *rdzv,
            "--max-restarts", "0", "--monitor-interval", "0.1", *args,
        ]
        environ = {
            **os.environ,
            "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")]),
            "GLOO_SOCKET_IFNAME": ifname,
            "OMP_NUM_THREADS": "1",
            "SYNCBN_TEST_HOST": host.namespace,
            **(env or {}),
        }
        for name in ("SYNCBN_TIMEOUT", "SYNCBN_DEBUG", "MASTER_ADDR", "MASTER_PORT", "RANK",
                     "WORLD_SIZE", "LOCAL_RANK"):
            if not env or name not in env:
                environ.pop(name, None)
        stdout = self.workdir / f"{tag}-h{host.index}.out"
        stderr = self.workdir / f"{tag}-h{host.index}.err"
        with stdout.open("wb") as out, stderr.open("wb") as err:
            process = subprocess.Popen(command, stdout=out, stderr=err, env=environ, cwd=ROOT,
                                       start_new_session=True)
        launch = Launch(host, process, stdout, stderr)
        self.launches.append(launch)
        return launch

    def cut(self, host: Host) -> float:
        """Take ``host``'s veth down (the peer loses its carrier too); the time it happened."""
        _ip("-n", host.namespace, "link", "set", host.ifname, "down")
        return time.time()


def _wait(launches: Sequence[Launch], limit_s: float) -> list[int]:
    """Exit codes of ``launches``; fail (the teardown kills them) if any outlives ``limit_s``."""
    deadline = time.monotonic() + limit_s
    while True:
        for launch in launches:
            if not launch.ended and launch.process.poll() is not None:
                launch.ended = time.time()
        if all(launch.ended for launch in launches):
            break
        if time.monotonic() > deadline:
            logs = "\n\n".join(f"--- host {launch.host.index}:\n{launch.output()[-3000:]}"
                               for launch in launches)
            pytest.fail(f"torchrun still running after {limit_s:.0f} s\n{logs}")
        time.sleep(0.1)
    return [int(launch.process.returncode) for launch in launches]


@pytest.fixture
def two_hosts(tmp_path: Path) -> Iterator[TwoHosts]:
    """Two fresh namespaces joined by a veth pair; everything in them dies at teardown."""
    _delete_stale_namespaces()
    stem = f"{PREFIX}{os.getpid()}-{next(_serial)}"
    hosts = [Host(i, f"{stem}-h{i}", f"sbnveth{i}", f"{SUBNET}.{i + 1}") for i in range(2)]
    created: list[str] = []
    world = TwoHosts(hosts, tmp_path)
    try:
        for host in hosts:
            made = _ip("netns", "add", host.namespace, check=False)
            if made.returncode != 0:
                pytest.skip(f"cannot create a network namespace: {made.stderr.strip()}")
            created.append(host.namespace)
        _ip("link", "add", hosts[0].ifname, "netns", hosts[0].namespace, "type", "veth",
            "peer", "name", hosts[1].ifname, "netns", hosts[1].namespace)
        for host in hosts:
            _ip("-n", host.namespace, "addr", "add", f"{host.addr}/24", "dev", host.ifname)
            _ip("-n", host.namespace, "link", "set", "lo", "up")
            _ip("-n", host.namespace, "link", "set", host.ifname, "up")
        yield world
    finally:
        for namespace in created:
            _kill_namespace_processes(namespace)
        for launch in world.launches:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(launch.process.pid, signal.SIGKILL)
            launch.process.wait(timeout=30)
        for namespace in created:
            _delete_namespace(namespace)
    assert not any(n in _namespaces() for n in created), "a test namespace was left behind"


def _rank_records(out: Path, world_size: int) -> list[dict[str, Any]]:
    records = []
    for rank in range(world_size):
        path = out / f"rank{rank}.json"
        assert path.exists(), f"rank {rank} never started (no {path.name})"
        records.append(json.loads(path.read_text()))
    return records


def _hosts_of(records: Sequence[dict[str, Any]]) -> dict[str, list[int]]:
    placed: dict[str, list[int]] = {}
    for record in records:
        placed.setdefault(record["host"], []).append(record["rank"])
    return placed


def test_syncbn_check_passes_across_two_hosts(two_hosts: TwoHosts,
                                              record_property: Any) -> None:
    args = ["-m", "syncbn", "check", "--iters", "2", "--timeout", "60"]
    launches = [two_hosts.torchrun(host, args, tag="check") for host in two_hosts.hosts]
    codes = _wait(launches, START_S)
    elapsed = time.time() - min(launch.started for launch in launches)
    text = "\n".join(launch.output() for launch in launches)
    assert codes == [0, 0], text[-4000:]
    assert "world size 4, launcher torchrun" in text, text[-4000:]
    assert "verdict: PASS" in text, text[-4000:]
    assert "FAIL" not in text
    record_property("check_seconds", round(elapsed, 2))


def _start_training(world: TwoHosts, out: Path, steps: int, *, two_hosts: bool) -> list[Launch]:
    out.mkdir()
    args = [str(TRAIN), "--out", str(out), "--steps", str(steps), "--ddp"]
    if two_hosts:
        return [world.torchrun(host, args, tag=out.name) for host in world.hosts]
    # the same 4 ranks on host 0 alone, over its loopback (its own rendezvous port)
    return [world.torchrun(world.hosts[0], args, nnodes=1, nproc=4, tag=out.name)]


def _finish_training(launches: Sequence[Launch], out: Path) -> list[dict[str, Any]]:
    codes = _wait(launches, START_S)
    assert codes == [0] * len(launches), "\n".join(launch.output()[-3000:] for launch in launches)
    records = _rank_records(out, 4)
    for record in records:
        record["launched"] = min(launch.started for launch in launches)
    return records


def test_training_over_two_hosts_equals_one_host(two_hosts: TwoHosts, tmp_path: Path,
                                                 record_property: Any) -> None:
    steps = 6
    # both runs at once: they share no address (10.213.0.x against 127.0.0.1 in host 0)
    multi_run = _start_training(two_hosts, tmp_path / "two-hosts", steps, two_hosts=True)
    single_run = _start_training(two_hosts, tmp_path / "one-host", steps, two_hosts=False)
    multi = _finish_training(multi_run, tmp_path / "two-hosts")
    single = _finish_training(single_run, tmp_path / "one-host")
    placed = _hosts_of(multi)
    assert sorted(placed) == sorted(h.namespace for h in two_hosts.hosts), placed
    assert all(len(ranks) == 2 for ranks in placed.values()), placed
    assert len(_hosts_of(single)) == 1

    worst = 0.0
    for rank in range(4):
        a = torch.load(tmp_path / "two-hosts" / f"rank{rank}.pt", weights_only=True)
        b = torch.load(tmp_path / "one-host" / f"rank{rank}.pt", weights_only=True)
        assert a.keys() == b.keys()
        assert int(a["1.num_batches_tracked"]) == steps
        for name in a:
            worst = max(worst, float((a[name].double() - b[name].double()).abs().max()))
            assert torch.equal(a[name], b[name]), (
                f"rank {rank} {name}: two hosts differ from one host by "
                f"{(a[name].double() - b[name].double()).abs().max():.3g}")
        reference = torch.load(tmp_path / "two-hosts" / "rank0.pt", weights_only=True)
        for name in a:  # DDP and syncbn keep every rank's copy identical
            assert torch.equal(a[name], reference[name]), f"rank {rank} {name} differs from rank 0"
    record_property("max_abs_difference", worst)
    record_property("rendezvous_seconds",
                    round(max(r["joined"] for r in multi) - multi[0]["launched"], 2))
    record_property("two_host_run_seconds",
                    round(max(r["finished"] for r in multi) - multi[0]["launched"], 2))
    record_property("one_host_run_seconds",
                    round(max(r["finished"] for r in single) - single[0]["launched"], 2))


def _cut_mid_training(world: TwoHosts, out: Path, record_property: Any) -> None:
    """Train (syncbn's collectives only), cut the link after 5 steps, time every rank's end.

    Without DDP on purpose: a rank waiting in DDP's gradient all-reduce when the link goes
    down is bounded by the group's timeout only (30 min here), which syncbn cannot shorten.
    """
    out.mkdir()
    args = [str(TRAIN), "--out", str(out), "--steps", "1000000"]
    env = {"SYNCBN_TIMEOUT": str(SYNCBN_TIMEOUT_S)}
    launches = [world.torchrun(host, args, env=env, tag=out.name) for host in world.hosts]

    deadline = time.monotonic() + START_S
    while True:
        done = [int(p.read_text() or 0) for p in out.glob("rank*.progress")]
        if len(done) == 4 and min(done) >= 5:
            break
        if time.monotonic() > deadline or any(run.process.poll() is not None for run in launches):
            pytest.fail("training did not reach step 5 on all 4 ranks:\n"
                        + "\n".join(launch.output()[-3000:] for launch in launches))
        time.sleep(0.05)
    records = _rank_records(out, 4)
    assert all(len(r) == 2 for r in _hosts_of(records).values())
    launched = min(launch.started for launch in launches)
    record_property("rendezvous_seconds", round(max(r["joined"] for r in records) - launched, 2))
    cut = world.cut(world.hosts[1])

    limit = SYNCBN_TIMEOUT_S + EXIT_SLACK_S
    ended: dict[int, float] = {}
    while len(ended) < 4 and time.time() - cut < limit:
        for record in records:
            if record["rank"] not in ended and not _alive(record["pid"]):
                ended[record["rank"]] = time.time() - cut
        time.sleep(0.1)
    errors = {}
    for rank in range(4):
        path = out / f"rank{rank}.error"
        if path.exists():
            errors[rank] = json.loads(path.read_text())
    for rank, error in errors.items():
        record_property(f"rank{rank}_error_seconds", round(error["time"] - cut, 2))
    for rank, seconds in ended.items():
        record_property(f"rank{rank}_exit_seconds", round(seconds, 2))
    raised = ", ".join(f"{r}: {e['type']} at {e['time'] - cut:.1f} s"
                       for r, e in sorted(errors.items()))
    gone = ", ".join(f"{r}: {s:.1f} s" for r, s in sorted(ended.items()))
    summary = (f"after the cut: ranks that raised {sorted(errors)} ({raised}); "
               f"ranks that ended {sorted(ended)} ({gone})")
    alive = sorted(set(range(4)) - set(ended))
    assert not alive, f"ranks {alive} still alive {limit:.0f} s after the cut; {summary}"
    record_property("slowest_exit_seconds", round(max(ended.values()), 2))
    # A rank's exit status is 0 only if main() returns, which needs every step done and
    # rankR.pt saved; a rank that recorded an error and then ended exited non-zero.
    assert sorted(errors) == [0, 1, 2, 3], f"not every rank recorded an error; {summary}"
    assert all(e["type"] == "SyncBatchNormError" for e in errors.values()), summary
    assert not list(out.glob("rank*.pt")), "a rank finished its million steps"
    store_host = launches[0]
    [code] = _wait([store_host], STORE_AGENT_EXIT_S)
    record_property("torchrun_h0_exit_seconds", round(store_host.ended - cut, 2))
    assert code != 0, f"host 0's torchrun exited {code}"
    record_property("torchrun_h1_running", launches[1].process.poll() is None)
    for launch in launches:
        text = launch.stderr.read_text(errors="replace")
        assert "SyncBatchNormError" in text, f"host {launch.host.index}'s stderr does not name it"
    # torchrun's own report of host 0's ranks: both failed, with non-zero codes
    reported = re.findall(r"^\s*exitcode\s*:\s*(-?\d+)",
                          store_host.stderr.read_text(errors="replace"), flags=re.MULTILINE)
    assert len(reported) == 2 and all(int(c) != 0 for c in reported), reported


def test_link_cut_ends_every_rank_on_both_hosts(two_hosts: TwoHosts, tmp_path: Path,
                                                record_property: Any) -> None:
    _cut_mid_training(two_hosts, tmp_path / "cut", record_property)
