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
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest

from tests.conftest import ROOT, ServerProcess, jpeg, required_binary, wait_until

HAPROXY_CFG = ROOT / "deploy" / "haproxy.cfg"
HEALTHCHECK = ROOT / "deploy" / "healthcheck.py"
NAMES = ("r1", "r2", "r3")
GRACE_S = 3.0  # the replicas' drain grace: HAProxy must mark a draining replica DOWN well within it
SHUTDOWN_S = 10.0
HANG_S = 60.0  # only stops a hang: what is waited for here takes a few seconds at most
# Appended to deploy/haproxy.cfg for the tests only. An admin socket, to point a server at the new port of a
# restarted replica (replicas bind port 0: the kernel picks a free port, no race). No SO_REUSEPORT: with it,
# a second HAProxy could bind the frontend port another one holds and the two would share its traffic.
TEST_CFG = "global\n    noreuseport\n    stats socket {admin} level admin\n"
_CLASSIFY_200 = re.compile(r'^resnest_requests_total\{route="/classify",status="200"\} (\S+)$', re.MULTILINE)
_GRPC_INFER_OK = re.compile(
    r'^resnest_requests_total\{route="/inference.GRPCInferenceService/ModelInfer",status="OK"\} (\S+)$', re.MULTILINE
)


def haproxy_binary() -> str:
    return required_binary("haproxy", ("/usr/sbin/haproxy", "/usr/local/sbin/haproxy"), "lb", "haproxy")


def free_port() -> int:
    """A loopback port that was free an instant ago; another process may take it before it is bound again."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def accepts(path: Path) -> bool:
    """Something listens on the Unix socket at `path` (probed on a socket of our own, closed either way)."""
    with socket.socket(socket.AF_UNIX) as sock:
        try:
            sock.connect(str(path))
        except OSError:
            return False
    return True


class HAProxy:
    """`haproxy -db -f deploy/haproxy.cfg` with the addresses in its environment, as docker-compose passes them.

    HAProxy cannot bind port 0, so its frontend gets a port picked just before; if another process takes it
    meanwhile, HAProxy fails to bind and exits, and it is started again on another port. Its stats listener
    and admin socket are Unix sockets in a private directory: nothing to race for.
    """

    def __init__(
        self, replicas: list[str], log_path: Path, attempts: int = 5, grpc: list[tuple[str, int]] | None = None
    ) -> None:
        """`grpc`: each replica's (gRPC host:port, HTTP port) for the optional gRPC frontend."""
        self._dir = Path(tempfile.mkdtemp(prefix="lb-"))  # short: a Unix socket path has at most 107 bytes
        self.admin_socket = self._dir / "admin.sock"
        self._stats_socket = stats_socket = self._dir / "stats.sock"
        test_cfg = self._dir / "test.cfg"
        test_cfg.write_text(TEST_CFG.format(admin=self.admin_socket))
        self.log_path = log_path
        self._log = open(log_path, "wb")  # noqa: SIM115 - closed in stop()
        self._stats = httpx.Client(
            transport=httpx.HTTPTransport(uds=str(stats_socket)), base_url="http://lb", timeout=5
        )
        for _ in range(attempts):
            self.port = free_port()
            env = {
                **os.environ,
                "LB_BIND": f"127.0.0.1:{self.port}",
                "LB_STATS_BIND": f"unix@{stats_socket}",
                **{f"REPLICA{i}": address for i, address in enumerate(replicas, 1)},
            }
            if grpc is not None:
                self.grpc_port = free_port()
                env["LB_GRPC_BIND"] = f"127.0.0.1:{self.grpc_port}"
                for i, (target, check_port) in enumerate(grpc, 1):
                    env[f"REPLICA{i}_GRPC"], env[f"REPLICA{i}_CHECK_PORT"] = target, str(check_port)
            command = [haproxy_binary(), "-db", "-f", str(HAPROXY_CFG), "-f", str(test_cfg)]
            logged = self.log_path.stat().st_size
            self.proc = subprocess.Popen(command, env=env, stdout=self._log, stderr=subprocess.STDOUT)
            if self._started(logged):
                break
        else:
            raise RuntimeError(f"haproxy could not bind a frontend port in {attempts} attempts:\n{self.log()}")
        self.url = f"http://127.0.0.1:{self.port}"

    def _started(self, logged: int) -> bool:
        """True once this HAProxy serves; False if it exited because its frontend port had been taken."""
        deadline = time.monotonic() + HANG_S
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                if "cannot bind socket" in self.log()[logged:]:
                    return False
                raise RuntimeError(f"haproxy exited with {self.proc.returncode}:\n{self.log()}")
            # The stats socket answers only once every listener is bound (a failed bind ends start-up), and it
            # is this process's own: the frontend port is then ours too.
            if accepts(self._stats_socket):
                self._stats.get("/stats;csv").raise_for_status()
                if self.proc.poll() is None:
                    return True
            time.sleep(0.05)
        raise TimeoutError(f"haproxy not serving after {HANG_S}s:\n{self.log()}")

    def command(self, line: str) -> str:
        """One command on the admin socket, and its answer."""
        with socket.socket(socket.AF_UNIX) as sock:
            sock.settimeout(5)
            sock.connect(str(self.admin_socket))
            sock.sendall(line.encode() + b"\n")
            answer = b""
            while chunk := sock.recv(65536):
                answer += chunk
        return answer.decode()

    def point(self, name: str, server: ServerProcess) -> None:
        """Send server `name`'s traffic and health checks to `server` (a restarted replica on a new port)."""
        host, port = server.wait_listening()
        answer = self.command(f"set server resnest/{name} addr {host} port {port}")
        assert "changed" in answer or "no need to change" in answer, answer

    def stats(self, backend: str = "resnest") -> dict[str, dict[str, str]]:
        """Per-server rows of the stats CSV (status, stot, hrsp_2xx, wretr, wredis...), keyed by server name."""
        text = self._stats.get("/stats;csv").text
        rows = csv.DictReader(io.StringIO(text.removeprefix("# ")))
        return {row["svname"]: row for row in rows if row["pxname"] == backend}

    def status(self, name: str, backend: str = "resnest") -> str:
        return self.stats(backend)[name]["status"]

    def wait_status(self, name: str, want: str, timeout: float, backend: str = "resnest") -> float:
        """Seconds until server `name` is exactly `want` ("UP" or "DOWN", not the transitional "UP 1/2")."""
        start = time.monotonic()
        while time.monotonic() - start < timeout:
            if self.proc.poll() is not None:
                raise RuntimeError(f"haproxy exited with {self.proc.returncode}:\n{self.log()}")
            try:
                if self.status(name, backend) == want:
                    return time.monotonic() - start
            except httpx.HTTPError:
                pass  # stats listener not bound yet
            time.sleep(0.02)
        raise TimeoutError(
            f"{name} not {want} after {timeout}s (now {self.status(name, backend)}):\n{self.log()[-3000:]}"
        )

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
        self._stats.close()
        self._log.close()
        shutil.rmtree(self._dir, ignore_errors=True)


def classified(server: ServerProcess) -> int:
    """The replica's own count of successful /classify requests (from its /metrics)."""
    match = _CLASSIFY_200.search(httpx.get(f"{server.url}/metrics", timeout=5).text)
    return int(float(match.group(1))) if match else 0


def grpc_inferred(server: ServerProcess) -> int:
    """The replica's own count of successful gRPC ModelInfer calls (from its /metrics)."""
    match = _GRPC_INFER_OK.search(httpx.get(f"{server.url}/metrics", timeout=5).text)
    return int(float(match.group(1))) if match else 0


def listening(server: ServerProcess) -> bool:
    """The replica still accepts connections and answers: its listener is open (within its drain grace)."""
    try:
        return httpx.get(f"{server.url}/healthz", timeout=5).status_code == 200
    except httpx.HTTPError:
        return False


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
    restart: Callable[[int], ServerProcess]  # a fresh replica in place of replicas[index], traffic pointed to it

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

    replicas = [server_factory(env, wait=False) for _ in NAMES]  # start in parallel (each on port 0), then wait
    for server in replicas:
        server.wait_ready()
    # HAProxy's addresses, as compose passes them, once the replicas have reported the ports they bound.
    lb = HAProxy(["{}:{}".format(*server.wait_listening()) for server in replicas], tmp_path / "haproxy.log")
    try:
        for name in NAMES:
            lb.wait_status(name, "UP", timeout=HANG_S)

        def restart(index: int) -> ServerProcess:
            server = server_factory(env)
            lb.point(NAMES[index], server)  # as compose's resolvers follow a restarted container's new address
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
    marked_down = cluster.lb.wait_status("r1", "DOWN", timeout=HANG_S)
    assert r1.proc.poll() is None, "r1 stopped before HAProxy noticed the drain"
    # Draining: not ready, still alive. /healthz answering shows r1's listener still open, so HAProxy took r1
    # out within its grace (whatever the machine's speed); HAProxy's retries would hide a later one.
    probes = (probe(r1, "/readyz"), probe(r1, "/healthz"))
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
    assert probes == (1, 0), "r1 must be marked DOWN while it still serves (within its grace)"
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
        target=lambda: down_at.append(killed_at + cluster.lb.wait_status("r2", "DOWN", timeout=HANG_S)), daemon=True
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
        watcher.join(timeout=HANG_S + 5)
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
    at_up: dict[str, int] = {}  # each restarted replica's 2xx count when HAProxy brought it back
    deadline = time.monotonic() + 90
    with Load(lb.url) as load:
        # The load is on every replica before the first one goes.
        wait_until(lambda: all(n > before[name] for name, n in lb.counts("hrsp_2xx").items()), timeout=HANG_S)
        for index, name in enumerate(NAMES):
            old = cluster.replicas[index]
            served_before = load.total()
            old.proc.send_signal(signal.SIGTERM)
            down_s = lb.wait_status(name, "DOWN", timeout=HANG_S)
            still_serving = listening(old)  # so HAProxy took it out within its grace, before its listener closed
            code = old.proc.wait(timeout=max(1.0, deadline - time.monotonic()))
            cluster.replicas[index] = cluster.restart(index)
            up_s = lb.wait_status(name, "UP", timeout=HANG_S)
            at_up[name] = lb.counts("hrsp_2xx")[name]
            steps.append(f"{name}: DOWN after {down_s:.2f}s, exit {code}, UP again {up_s:.2f}s after ready")
            assert still_serving, f"{name} had closed its listener before HAProxy marked it DOWN"
            assert code == 0, old.log()[-3000:]
            assert load.total() > served_before, "the load generator stalled"
        # Traffic returns to every restarted replica.
        wait_until(lambda: all(n > at_up[name] for name, n in lb.counts("hrsp_2xx").items()), timeout=HANG_S)
    served = {name: n - before[name] for name, n in lb.counts("hrsp_2xx").items()}
    print("\nrolling restart:\n  " + "\n  ".join(steps))
    print(f"  {load.total()} requests by {load.clients} clients, statuses {dict(load.statuses)}, per replica {served}")
    assert set(load.statuses) == {200}, dict(load.statuses)
    assert load.total() >= 100
    assert all(n > 0 for n in served.values()), served


def test_grpc_through_haproxy_spreads_calls_and_drains_a_replica(
    server_factory: Callable[..., ServerProcess], tiny_onnx: Path, tmp_path: Path
) -> None:
    """The gRPC frontend: HTTP/2 to the replicas, every call balanced on its own (one client channel reaches
    both replicas), and a draining replica taken out by its /readyz with no call lost."""
    import numpy as np
    import tritonclient.grpc as tg

    env = {
        "RESNEST_MODEL_PATH": str(tiny_onnx),
        "RESNEST_DRAIN_GRACE_S": str(GRACE_S),
        "RESNEST_SHUTDOWN_TIMEOUT_S": str(SHUTDOWN_S),
        "RESNEST_INTRA_OP_THREADS": "1",
        "RESNEST_DECODE_THREADS": "1",
    }
    replicas = [server_factory(env, wait=False) for _ in range(2)]
    for server in replicas:
        server.wait_ready()
    lb = HAProxy(
        ["{}:{}".format(*r.wait_listening()) for r in replicas],
        tmp_path / "haproxy.log",
        grpc=[(r.grpc_target, r.port) for r in replicas],
    )
    try:
        for name in ("g1", "g2"):
            lb.wait_status(name, "UP", timeout=HANG_S, backend="resnest-grpc")
        tensor = tg.InferInput("image_bytes", [1, 1], "BYTES")
        tensor.set_data_from_numpy(np.array([jpeg((64, 48))], dtype=object).reshape(1, 1))
        failures: list[str] = []
        served = 0
        with tg.InferenceServerClient(f"127.0.0.1:{lb.grpc_port}") as client:
            for _ in range(40):
                client.infer("tiny", [tensor], client_timeout=30)
            per_replica = [grpc_inferred(r) for r in replicas]
            assert sum(per_replica) == 40 and min(per_replica) >= 5, per_replica

            stop = threading.Event()

            def load() -> None:
                nonlocal served
                while not stop.is_set():
                    try:
                        client.infer("tiny", [tensor], client_timeout=30)
                        served += 1
                    except Exception as exc:  # every failure is the finding
                        failures.append(repr(exc))

            worker = threading.Thread(target=load)
            worker.start()
            try:
                wait_until(lambda: served >= 5)
                replicas[0].proc.send_signal(signal.SIGTERM)
                marked_down = lb.wait_status("g1", "DOWN", timeout=HANG_S, backend="resnest-grpc")
                code = replicas[0].proc.wait(timeout=GRACE_S + SHUTDOWN_S + 10)
                after = served
                wait_until(lambda: served >= after + 10)  # r2 alone serves on
            finally:
                stop.set()
                worker.join(timeout=60)
        print(f"\n40 gRPC calls via HAProxy: per replica {per_replica}; g1 DOWN {marked_down:.2f}s after SIGTERM; "
              f"{served} calls under load, failures {failures}; r1 exit {code}")  # fmt: skip
        assert marked_down < GRACE_S
        assert failures == []
        assert code == 0
    finally:
        lb.stop()
