"""The docker-compose topology without containers: replicas on loopback behind the real HAProxy, configured by
the same deploy/haproxy.cfg. Proves with counts that traffic spreads, that draining and killed replicas stop
receiving traffic, and that a rolling restart under load loses no request."""

from __future__ import annotations

import csv
import io
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest

from tests.conftest import ROOT, ServerProcess, free_port, jpeg

HAPROXY_CFG = ROOT / "deploy" / "haproxy.cfg"
HEALTHCHECK = ROOT / "deploy" / "healthcheck.py"
NAMES = ("r1", "r2", "r3")
GRACE_S = 3.0  # the replicas' drain grace: HAProxy must mark a draining replica DOWN well within it
SHUTDOWN_S = 10.0
_CLASSIFY_200 = re.compile(r'^resnest_requests_total\{route="/classify",status="200"\} (\S+)$', re.MULTILINE)


def haproxy_binary() -> str:
    path = shutil.which("haproxy") or next(
        (p for p in ("/usr/sbin/haproxy", "/usr/local/sbin/haproxy") if os.access(p, os.X_OK)), None
    )
    if path is None:  # not a skip: CI must run these, and `make test` installs it
        pytest.fail("haproxy is not installed: run `make lb` (installs Debian's haproxy package)", pytrace=False)
    return path


class HAProxy:
    """`haproxy -db -f deploy/haproxy.cfg` with the addresses in its environment, as docker-compose passes them."""

    def __init__(self, replicas: list[str], log_path: Path) -> None:
        self.port, self.stats_port = free_port(), free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        env = {
            **os.environ,
            "LB_BIND": f"127.0.0.1:{self.port}",
            "LB_STATS_BIND": f"127.0.0.1:{self.stats_port}",
            **{f"REPLICA{i}": address for i, address in enumerate(replicas, 1)},
        }
        self.log_path = log_path
        self._log = open(log_path, "wb")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            [haproxy_binary(), "-db", "-f", str(HAPROXY_CFG)], env=env, stdout=self._log, stderr=subprocess.STDOUT
        )

    def stats(self) -> dict[str, dict[str, str]]:
        """Per-server rows of the stats CSV (status, stot, hrsp_2xx, wretr, wredis...), keyed by server name."""
        text = httpx.get(f"http://127.0.0.1:{self.stats_port}/stats;csv", timeout=2).text
        rows = csv.DictReader(io.StringIO(text.removeprefix("# ")))
        return {row["svname"]: row for row in rows if row["pxname"] == "resnest"}

    def status(self, name: str) -> str:
        return self.stats()[name]["status"]

    def wait_status(self, name: str, want: str, timeout: float) -> float:
        """Seconds until server `name` is exactly `want` ("UP" or "DOWN", not the transitional "UP 1/2")."""
        start = time.monotonic()
        while time.monotonic() - start < timeout:
            if self.proc.poll() is not None:
                raise RuntimeError(f"haproxy exited with {self.proc.returncode}:\n{self.log()}")
            try:
                if self.status(name) == want:
                    return time.monotonic() - start
            except httpx.HTTPError:
                pass  # stats listener not bound yet
            time.sleep(0.02)
        raise TimeoutError(f"{name} not {want} after {timeout}s (now {self.status(name)}):\n{self.log()[-3000:]}")

    def counts(self, column: str) -> dict[str, int]:
        stats = self.stats()
        return {name: int(stats[name][column] or 0) for name in NAMES}

    def log(self) -> str:
        self._log.flush()
        return self.log_path.read_text(errors="replace")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(timeout=10)
        self._log.close()


def classified(server: ServerProcess) -> int:
    """The replica's own count of successful /classify requests (from its /metrics)."""
    match = _CLASSIFY_200.search(httpx.get(f"{server.url}/metrics", timeout=5).text)
    return int(float(match.group(1))) if match else 0


def probe(server: ServerProcess, path: str) -> int:
    """Exit status of the images' health probe script (what Docker and compose run) against `server`."""
    env = {**os.environ, "RESNEST_PORT": str(server.port)}
    return subprocess.run([sys.executable, str(HEALTHCHECK), path], env=env, capture_output=True, timeout=10).returncode


def classify(client: httpx.Client, index: int = 0) -> int:
    color = (index * 37 % 256, index * 91 % 256, index * 53 % 256)  # distinct inputs, not one cached answer
    files = [("images", (f"img{index}.jpg", jpeg((64, 48), color), "image/jpeg"))]
    return client.post("/classify", files=files).status_code


@dataclass
class Cluster:
    lb: HAProxy
    replicas: list[ServerProcess]
    restart: Callable[[int], ServerProcess]  # a fresh replica on the given port (HAProxy's config is static)

    def replica_counts(self) -> dict[str, int]:
        return {name: classified(r) for name, r in zip(NAMES, self.replicas, strict=True)}


@pytest.fixture
def cluster(server_factory: Callable[..., ServerProcess], tiny_onnx: Path, tmp_path: Path) -> Iterator[Cluster]:
    haproxy_binary()
    env = {
        "RESNEST_MODEL_PATH": str(tiny_onnx),
        "RESNEST_PROVIDERS": "cpu",  # as in docker-compose.yml
        "RESNEST_DRAIN_GRACE_S": str(GRACE_S),
        "RESNEST_SHUTDOWN_TIMEOUT_S": str(SHUTDOWN_S),
        "RESNEST_MAX_BATCH_SIZE": "4",
        "RESNEST_INTRA_OP_THREADS": "1",
        "RESNEST_DECODE_THREADS": "1",
    }

    def start(port: int) -> ServerProcess:
        server = server_factory({**env, "RESNEST_PORT": str(port)}, wait=False)
        server.port, server.url = port, f"http://127.0.0.1:{port}"
        return server

    ports: list[int] = []
    while len(ports) < len(NAMES):
        if (port := free_port()) not in ports:
            ports.append(port)
    replicas = [start(port) for port in ports]  # start in parallel, then wait
    for server in replicas:
        server.wait_ready()
    lb = HAProxy([f"127.0.0.1:{port}" for port in ports], tmp_path / "haproxy.log")
    try:
        for name in NAMES:
            lb.wait_status(name, "UP", timeout=15)

        def restart(port: int) -> ServerProcess:
            server = start(port)
            server.wait_ready()
            return server

        yield Cluster(lb, replicas, restart)
    finally:
        lb.stop()


def test_config_accepts_two_or_three_replicas() -> None:
    """REPLICA3 is optional: `haproxy -c` validates the file with two and with three addresses."""
    base = {k: v for k, v in os.environ.items() if not k.startswith(("REPLICA", "LB_"))}
    for replicas in (2, 3):
        env = {**base, "LB_BIND": "127.0.0.1:1", **{f"REPLICA{i}": f"127.0.0.1:{i}" for i in range(1, replicas + 1)}}
        out = subprocess.run(
            [haproxy_binary(), "-c", "-f", str(HAPROXY_CFG)], env=env, capture_output=True, text=True, timeout=10
        )
        assert out.returncode == 0, out.stdout + out.stderr
        assert "WARNING" not in out.stdout + out.stderr, out.stdout + out.stderr


def test_traffic_spreads_over_all_replicas(cluster: Cluster) -> None:
    with httpx.Client(base_url=cluster.lb.url, timeout=30) as client:
        statuses = Counter(classify(client, i) for i in range(60))
    per_replica = cluster.replica_counts()
    print(f"\n60 sequential requests: statuses {dict(statuses)}, per replica {per_replica}")
    assert statuses == {200: 60}
    assert sum(per_replica.values()) == 60
    assert all(n >= 10 for n in per_replica.values()), per_replica


def test_draining_replica_stops_receiving_traffic(cluster: Cluster) -> None:
    r1 = cluster.replicas[0]
    with httpx.Client(base_url=cluster.lb.url, timeout=30) as client:
        assert Counter(classify(client, i) for i in range(30)) == {200: 30}  # r1 serves its share first
    assert (probe(r1, "/readyz"), probe(r1, "/healthz")) == (0, 0)
    before_lb = cluster.lb.counts("stot")["r1"]
    r1.proc.send_signal(signal.SIGTERM)
    marked_down = cluster.lb.wait_status("r1", "DOWN", timeout=GRACE_S)
    assert r1.proc.poll() is None, "r1 stopped before HAProxy noticed the drain"
    probes = (probe(r1, "/readyz"), probe(r1, "/healthz"))  # draining: not ready, still alive
    before = classified(r1)  # still answering: within its grace
    with httpx.Client(base_url=cluster.lb.url, timeout=30) as client:
        statuses = Counter(classify(client, 100 + i) for i in range(30))
    after = classified(r1) if r1.proc.poll() is None else None
    lb_delta = cluster.lb.counts("stot")["r1"] - before_lb
    code = r1.proc.wait(timeout=GRACE_S + SHUTDOWN_S + 10)
    print(
        f"\nr1 marked DOWN {marked_down:.2f}s after SIGTERM (grace {GRACE_S}s); 30 requests: {dict(statuses)}; "
        f"r1 /classify 200s {before} -> {after}; HAProxy sessions to r1 since SIGTERM {lb_delta}; exit {code}; "
        f"probe exits (readyz, healthz) while draining {probes}"
    )
    assert marked_down < GRACE_S
    assert probes == (1, 0)
    assert statuses == {200: 30}
    assert before >= 5
    assert after is None or after == before
    assert lb_delta == 0
    assert code == 0


@dataclass
class Outcome:
    at: float
    status: int | None  # None: the client saw a connection error
    error: str = ""


def test_killed_replica_is_retried_elsewhere(cluster: Cluster) -> None:
    r2 = cluster.replicas[1]
    before = cluster.lb.stats()
    r2.proc.kill()  # idle: HAProxy still believes it UP and holds keep-alive connections to it
    r2.proc.wait(timeout=10)
    killed_at = time.monotonic()
    down_at: list[float] = []
    watcher = threading.Thread(
        target=lambda: down_at.append(killed_at + cluster.lb.wait_status("r2", "DOWN", timeout=10)), daemon=True
    )
    watcher.start()
    outcomes: list[Outcome] = []
    with httpx.Client(base_url=cluster.lb.url, timeout=30) as client:

        def send(i: int) -> None:
            try:
                outcomes.append(Outcome(time.monotonic(), classify(client, i)))
            except httpx.HTTPError as exc:
                outcomes.append(Outcome(time.monotonic(), None, repr(exc)))

        i = 0
        while watcher.is_alive() and i < 2000:  # until HAProxy marks r2 DOWN: the window retries must cover
            send(i)
            i += 1
        watcher.join(timeout=15)
        assert down_at, f"r2 never marked DOWN:\n{cluster.lb.log()[-3000:]}"
        for j in range(30):
            send(i + j)
    after = cluster.lb.stats()
    early = [o for o in outcomes if o.at <= down_at[0]]
    late = [o for o in outcomes if o.at > down_at[0]]
    failed_early = [o for o in early if o.status != 200]
    failed_late = [o for o in late if o.status != 200]
    retries = int(after["BACKEND"]["wretr"] or 0) - int(before["BACKEND"]["wretr"] or 0)
    redispatches = int(after["BACKEND"]["wredis"] or 0) - int(before["BACKEND"]["wredis"] or 0)
    print(
        f"\nr2 killed, marked DOWN after {down_at[0] - killed_at:.2f}s; before DOWN {len(early)} requests, "
        f"{len(failed_early)} failed {[(o.status, o.error) for o in failed_early]}; after DOWN {len(late)} "
        f"requests, {len(failed_late)} failed; HAProxy retries {retries}, redispatches {redispatches}; "
        f"per replica {cluster.lb.counts('hrsp_2xx')}"
    )
    assert len(late) >= 30
    assert not failed_late, failed_late
    assert not failed_early, failed_early  # retry-on conn-failure + redispatch cover the blind window


@dataclass
class Load:
    """Client threads posting /classify through the balancer in a loop until stopped."""

    url: str
    clients: int = 4
    statuses: Counter[int | str] = field(default_factory=Counter)
    stop: threading.Event = field(default_factory=threading.Event)
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _threads: list[threading.Thread] = field(default_factory=list)

    def _loop(self, worker: int) -> None:
        with httpx.Client(base_url=self.url, timeout=30) as client:
            i = 0
            while not self.stop.is_set():
                try:
                    outcome: int | str = classify(client, worker * 100_000 + i)
                except httpx.HTTPError as exc:
                    outcome = type(exc).__name__
                with self._lock:
                    self.statuses[outcome] += 1
                i += 1

    def __enter__(self) -> Load:
        self._threads = [threading.Thread(target=self._loop, args=(w,), daemon=True) for w in range(self.clients)]
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        for thread in self._threads:
            thread.join(timeout=35)

    def total(self) -> int:
        with self._lock:
            return sum(self.statuses.values())


def test_rolling_restart_under_load_loses_no_request(cluster: Cluster) -> None:
    lb = cluster.lb
    before = lb.counts("hrsp_2xx")
    steps: list[str] = []
    deadline = time.monotonic() + 90
    with Load(lb.url) as load:
        time.sleep(1.0)
        for index, name in enumerate(NAMES):
            old = cluster.replicas[index]
            served_before = load.total()
            old.proc.send_signal(signal.SIGTERM)
            down_s = lb.wait_status(name, "DOWN", timeout=GRACE_S)
            code = old.proc.wait(timeout=max(1.0, deadline - time.monotonic()))
            cluster.replicas[index] = cluster.restart(old.port)
            up_s = lb.wait_status(name, "UP", timeout=15)
            steps.append(f"{name}: DOWN after {down_s:.2f}s, exit {code}, UP again {up_s:.2f}s after ready")
            assert code == 0, old.log()[-3000:]
            assert load.total() > served_before, "the load generator stalled"
        time.sleep(1.0)
    served = {name: n - before[name] for name, n in lb.counts("hrsp_2xx").items()}
    print("\nrolling restart:\n  " + "\n  ".join(steps))
    print(f"  {load.total()} requests by {load.clients} clients, statuses {dict(load.statuses)}, per replica {served}")
    assert set(load.statuses) == {200}, dict(load.statuses)
    assert load.total() >= 100
    assert all(n > 0 for n in served.values()), served
