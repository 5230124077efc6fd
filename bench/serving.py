"""Service benchmark: the real server under a concurrency sweep, against the model's ceiling and a naive server.

    python -m bench.serving --model artifacts/resnest50-fp32.onnx [--duration 20] [--soak-requests 10000]

Everything runs on this machine in one go, so ratios compare like with like: (a) the ceiling, the raw ORT
session in-process on preprocessed tensors at its best batch size; (b) preprocessing alone per image;
(c) our server (`python -m service`, production settings) driven by a separate load-generator process at
concurrency 1/4/16/64 with 1 and 8 images per request; (d) the naive server (one ORT call per request, no
batching) under the same load; (e) a memory soak. Results: JSON, markdown and a PNG under bench/results/.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import re
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import onnxruntime as ort
import psutil
from PIL import Image

from imaging import preprocess
from modelcard import FEATURES, ModelCard

from .machine import describe, summary

ROOT = Path(__file__).resolve().parents[1]
BENCH_ENV = {  # production defaults, but a queue deep enough for 64 clients x 8 images without 429s
    "RESNEST_MAX_QUEUE_SIZE": "1024",
    "RESNEST_MAX_IMAGES_PER_REQUEST": "16",
    "RESNEST_REQUEST_TIMEOUT_S": "300",
    "RESNEST_LOG_LEVEL": "warning",
}


def bench_photos(folder: Path) -> list[bytes]:
    """The bundled photographs as JPEG (quality 90) with the longer side 500 px, like typical uploads."""
    from export.photos import sample_photos

    folder.mkdir(parents=True, exist_ok=True)
    out = []
    for name, data in sample_photos():
        img = Image.open(io.BytesIO(data)).convert("RGB")
        scale = 500 / max(img.size)
        img = img.resize((round(img.size[0] * scale), round(img.size[1] * scale)), Image.Resampling.BICUBIC)
        buf = io.BytesIO()
        img.save(buf, "JPEG", quality=90)
        (folder / f"{Path(name).stem}.jpg").write_bytes(buf.getvalue())
        out.append(buf.getvalue())
    return out


def preprocess_cost(photos: list[bytes], card: ModelCard, repeats: int = 5) -> dict[str, float]:
    """Median ms per image of decode + resize + crop + normalise, on one core."""
    times = []
    for _ in range(repeats):
        for blob in photos:
            start = time.perf_counter()
            preprocess(blob, card.preprocess, 40_000_000)
            times.append(time.perf_counter() - start)
    ms = statistics.median(times) * 1000
    return {"ms_per_image": ms, "images_per_s_per_core": 1000 / ms}


def ceiling(model: Path, photos: list[bytes], batches: list[int], seconds: float = 8.0) -> dict[str, Any]:
    """The raw session's throughput per batch size on preprocessed tensors, and its single-image latency."""
    session = ort.InferenceSession(str(model), providers=["CUDAExecutionProvider", "CPUExecutionProvider"])
    card = ModelCard.from_metadata(session.get_modelmeta().custom_metadata_map)
    tensors = np.stack([preprocess(b, card.preprocess, 40_000_000) for b in photos])
    # What the service fetches for /classify and /embed: the feature map stays inside ORT unless asked for.
    fetch = [o.name for o in session.get_outputs() if o.name != FEATURES]
    rates: dict[int, float] = {}
    single: list[float] = []
    for n in batches:
        batch = np.ascontiguousarray(tensors[np.arange(n) % len(tensors)])
        session.run(fetch, {"images": batch})
        runs: list[float] = []
        end = time.perf_counter() + seconds
        while time.perf_counter() < end or len(runs) < 3:
            start = time.perf_counter()
            session.run(fetch, {"images": batch})
            runs.append(time.perf_counter() - start)
        rates[n] = n / statistics.median(runs)
        if n == 1:
            single = runs
    best = max(rates, key=rates.__getitem__)
    return {
        "providers": session.get_providers(),
        "images_per_s_by_batch": rates,
        "best_batch": best,
        "images_per_s": rates[best],
        "single_image_ms": statistics.median(single) * 1000 if single else float("nan"),
    }


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def server(
    command: list[str], env: dict[str, str], url: str, cwd: Path = ROOT, ready: str = "/readyz", log: Path | None = None
) -> Iterator[subprocess.Popen[bytes]]:
    """Start a server process in `cwd` (whose packages it imports), wait until GET `ready` is 200, stop it
    afterwards. With `log`, its output goes there and a failure to start quotes the end of it."""
    out = open(log, "wb") if log is not None else subprocess.DEVNULL  # noqa: SIM115 - closed below
    # A session of its own: the server's whole process group (LitServe's and MLServer's workers too) is
    # stopped with it, and none is left running to skew the next measurement.
    proc = subprocess.Popen(command, cwd=cwd, env={**os.environ, **env}, stdout=out,
                            stderr=subprocess.STDOUT if log is not None else None, start_new_session=True)  # fmt: skip

    def tail() -> str:
        return f":\n{log.read_text(errors='replace')[-3000:]}" if log is not None else ""

    try:
        deadline = time.monotonic() + 180
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"{command} exited with {proc.returncode}{tail()}")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{url}{ready}", timeout=2).status_code == 200:
                    break
            if time.monotonic() > deadline:
                raise TimeoutError(f"{command} not ready{tail()}")
            time.sleep(0.2)
        yield proc
    finally:
        # Its descendants, found before it stops: a child in a session of its own (BentoML's workers) is
        # outside the group and must not outlive it either.
        try:
            descendants = psutil.Process(proc.pid).children(recursive=True)
        except psutil.Error:
            descendants = []
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)  # whatever of the group outlived its leader
        for child in descendants:
            with contextlib.suppress(psutil.Error):
                child.kill()
        if log is not None:
            out.close()  # type: ignore[union-attr]


class Sampler:
    """Samples the CPU% and RSS of a process and its children (a peer's worker processes) in the background."""

    def __init__(self, pid: int, every: float = 0.5) -> None:
        self.proc = psutil.Process(pid)
        self.every, self.cpu, self.rss = every, [], []  # type: ignore[var-annotated]
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._tree: dict[int, psutil.Process] = {}

    def _processes(self) -> list[psutil.Process]:
        """The process and its children, the same objects each time (cpu_percent measures since the last call)."""
        with contextlib.suppress(psutil.Error):
            for child in [self.proc, *self.proc.children(recursive=True)]:
                self._tree.setdefault(child.pid, child)
        return list(self._tree.values())

    def _run(self) -> None:
        for proc in self._processes():
            with contextlib.suppress(psutil.Error):
                proc.cpu_percent()
        while not self._stop.wait(self.every):
            cpu, rss = 0.0, 0
            for proc in self._processes():
                with contextlib.suppress(psutil.Error):
                    cpu += proc.cpu_percent()
                    rss += proc.memory_info().rss
            self.cpu.append(cpu)
            self.rss.append(rss)

    def __enter__(self) -> Sampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def summary(self) -> dict[str, float]:
        return {
            "server_cpu_percent": statistics.mean(self.cpu) if self.cpu else float("nan"),
            "server_rss_mib": max(self.rss) / 2**20 if self.rss else float("nan"),
        }


def scrape(url: str) -> dict[str, float]:
    text = httpx.get(f"{url}/metrics", timeout=10).text
    out = {}
    for name in ("resnest_batch_size_sum", "resnest_batch_size_count"):
        match = re.search(rf"^{name} ([0-9.e+-]+)$", text, re.MULTILINE)
        out[name] = float(match.group(1)) if match else 0.0
    return out


def load(url: str, photos_dir: Path, concurrency: int, images: int, duration: float, warmup: float) -> dict[str, Any]:
    command = [
        sys.executable, "-m", "bench.loadgen", "--url", url, "--concurrency", str(concurrency), "--images",
        str(images), "--duration", str(duration), "--warmup", str(warmup), "--photos", str(photos_dir),
    ]  # fmt: skip
    proc = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, check=True)
    return json.loads(proc.stdout.strip().splitlines()[-1])


def sweep(
    url: str, pid: int, photos_dir: Path, concurrencies: list[int], images: list[int], duration: float, warmup: float,
    batch_metrics: bool,
) -> list[dict[str, Any]]:  # fmt: skip
    rows = []
    for m in images:
        for c in concurrencies:
            before = scrape(url) if batch_metrics else {}
            with Sampler(pid) as sampler:
                row = load(url, photos_dir, c, m, duration, warmup)
            row.update(sampler.summary())
            if batch_metrics:
                after = scrape(url)
                batches = after["resnest_batch_size_count"] - before["resnest_batch_size_count"]
                images_run = after["resnest_batch_size_sum"] - before["resnest_batch_size_sum"]
                row["mean_batch_size"] = images_run / batches if batches else float("nan")
            rows.append(row)
            print(
                f"  c={c:3d} m={m}: {row['images_per_s']:7.1f} img/s, p50 {row['p50_ms']:7.1f} ms, "
                f"p99 {row['p99_ms']:7.1f} ms, errors {row['errors']}, batch {row.get('mean_batch_size', '-')}",
                file=sys.stderr,
                flush=True,
            )
    return rows


def soak(url: str, pid: int, photos: list[bytes], requests: int, concurrency: int = 8) -> dict[str, float]:
    """RSS after warm-up vs after `requests` more requests."""
    import asyncio

    async def fire(n: int) -> int:
        ok = 0
        sem = asyncio.Semaphore(concurrency)
        async with httpx.AsyncClient(base_url=url, timeout=120) as client:

            async def one(i: int) -> None:
                nonlocal ok
                async with sem:
                    r = await client.post(
                        "/classify", files={"images": ("a.jpg", photos[i % len(photos)], "image/jpeg")}
                    )
                    ok += r.status_code == 200

            await asyncio.gather(*(one(i) for i in range(n)))
        return ok

    proc = psutil.Process(pid)
    asyncio.run(fire(200))
    warm = proc.memory_info().rss
    start = time.perf_counter()
    ok = asyncio.run(fire(requests))
    after = proc.memory_info().rss
    return {
        "requests": requests,
        "ok": ok,
        "seconds": time.perf_counter() - start,
        "rss_after_warmup_mib": warm / 2**20,
        "rss_after_mib": after / 2**20,
        "growth_percent": 100 * (after - warm) / warm,
    }


def goals(result: dict[str, Any]) -> list[tuple[str, str, bool]]:
    """The issue's CPU goals, each as (goal, measured, met)."""
    ours = {(r["concurrency"], r["images_per_request"]): r for r in result["ours"]}
    naive = {(r["concurrency"], r["images_per_request"]): r for r in result["naive"]}
    ceil = result["ceiling"]["images_per_s"]
    peak = max(r["images_per_s"] for r in result["ours"])
    out = [("peak throughput >= 0.9x ceiling", f"{peak:.1f} / {ceil:.1f} = {peak / ceil:.2f}x", peak >= 0.9 * ceil)]
    if (1, 1) in ours:
        budget = result["ceiling"]["single_image_ms"] + result["preprocess"]["ms_per_image"]
        p50 = ours[(1, 1)]["p50_ms"]
        measured = f"{p50:.1f} ms / {budget:.1f} ms = {p50 / budget:.2f}x"
        out.append(("c=1 p50 <= 1.15x (inference + preprocessing)", measured, p50 <= 1.15 * budget))
    top = max(c for c, _ in ours)
    for (c, m), row in sorted(ours.items()):
        if c == top:
            bound = 2 * c * m / row["images_per_s"] * 1000
            measured = f"p99 {row['p99_ms']:.0f} ms (bound {bound:.0f} ms), errors {row['errors']}"
            met = row["p99_ms"] <= bound and row["errors"] == 0
            out.append((f"c={c} m={m}: p99 <= 2x queue/throughput, no errors", measured, met))
    for m in sorted({m for _, m in ours}):
        if (16, m) in ours and (16, m) in naive:
            ratio = ours[(16, m)]["images_per_s"] / naive[(16, m)]["images_per_s"]
            out.append((f"c=16 m={m}: >= 1.2x naive throughput", f"{ratio:.2f}x", ratio >= 1.2))
    if soaked := result.get("soak"):
        growth = soaked["growth_percent"]
        out.append(
            (f"RSS after {soaked['requests']} requests within 10% of warm", f"{growth:+.1f}%", abs(growth) <= 10)
        )
    return out


def plot(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_tp, ax_lat) = plt.subplots(1, 2, figsize=(11, 4.2))
    for label, rows, style in (("ours", result["ours"], "-o"), ("naive", result["naive"], "--s")):
        for m in sorted({r["images_per_request"] for r in rows}):
            pts = sorted(
                (r["concurrency"], r["images_per_s"], r["p99_ms"]) for r in rows if r["images_per_request"] == m
            )
            xs = [p[0] for p in pts]
            ax_tp.plot(xs, [p[1] for p in pts], style, label=f"{label}, {m} img/request")
            ax_lat.plot(xs, [p[2] for p in pts], style, label=f"{label}, {m} img/request")
    ax_tp.axhline(result["ceiling"]["images_per_s"], color="k", linestyle=":", label="ceiling (raw ORT, best batch)")
    for ax, title in ((ax_tp, "throughput (images/s)"), (ax_lat, "p99 latency (ms)")):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("concurrency (clients)")
        ax.set_title(title)
        ax.grid(alpha=0.3)
    ax_tp.set_ylim(bottom=0)  # throughput from zero: no exaggerated gaps
    ax_lat.set_yscale("log")
    ax_tp.legend(fontsize=7)
    fig.suptitle(f"{result['variant']} on {summary(result['machine'])}", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def _row(label: str, r: dict[str, Any]) -> str:
    nan = float("nan")
    cells = [
        label, r["concurrency"], r["images_per_request"], f"{r['images_per_s']:.1f}", f"{r['p50_ms']:.0f}",
        f"{r['p90_ms']:.0f}", f"{r['p99_ms']:.0f}", r["errors"], f"{r.get('mean_batch_size', float('nan')):.2f}",
        f"{r['server_cpu_percent']:.0f}", f"{r['server_rss_mib']:.0f}", f"{r.get('client_cpu_percent', nan):.0f}",
    ]  # fmt: skip
    return "| " + " | ".join(str(c) for c in cells) + " |"


def write(result: dict[str, Any], out: Path, tag: str) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / f"serving-{tag}.json").write_text(json.dumps(result, indent=2) + "\n")
    ceil, pre = result["ceiling"], result["preprocess"]
    by_batch = ", ".join(f"b{k}: {v:.1f}" for k, v in ceil["images_per_s_by_batch"].items())
    lines = [
        f"# Serving benchmark ({tag}): {result['variant']}, {result['providers'][0]}",
        "",
        f"Machine: {summary(result['machine'])}; {result['machine']['date']}. Server settings: {result['settings']}.",
        "",
        f"- Ceiling (raw ORT session, preprocessed tensors): {ceil['images_per_s']:.1f} img/s at batch "
        f"{ceil['best_batch']} ({by_batch}); single image {ceil['single_image_ms']:.1f} ms.",
        f"- Preprocessing alone (decode, resize, crop, normalise; 500 px JPEG): {pre['ms_per_image']:.2f} ms/image "
        f"= {pre['images_per_s_per_core']:.0f} img/s per core.",
        "",
        "| server | clients | img/req | img/s | p50 ms | p90 ms | p99 ms | errors | mean batch | CPU % | RSS MiB "
        "| client CPU % |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    lines += [_row(label, r) for label in ("ours", "naive") for r in result[label]]
    if soaked := result.get("soak"):
        lines += [
            "",
            f"Memory soak ({soaked['model']}): RSS {soaked['rss_after_warmup_mib']:.0f} MiB after warm-up, "
            f"{soaked['rss_after_mib']:.0f} MiB after {soaked['requests']} requests "
            f"({soaked['growth_percent']:+.1f}%), {soaked['ok']} answered 200.",
        ]
    lines += ["", "| goal | measured | met |", "|---|---|---|"]
    lines += [f"| {goal} | {measured} | {'yes' if met else 'NO'} |" for goal, measured, met in goals(result)]
    (out / f"serving-{tag}.md").write_text("\n".join(lines) + "\n")
    plot(result, out / f"serving-{tag}.png")
    print("\n".join(lines))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=Path("artifacts/resnest50-fp32.onnx"))
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16, 64])
    parser.add_argument("--images", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--duration", type=float, default=20.0, help="measurement window per point (s)")
    parser.add_argument("--warmup", type=float, default=5.0, help="unmeasured ramp-up per point (s)")
    parser.add_argument("--ceiling-batches", type=int, nargs="+", default=[1, 2, 4, 8, 16])
    parser.add_argument("--ceiling-seconds", type=float, default=8.0, help="timed runs per ceiling batch size (s)")
    parser.add_argument("--skip-naive", action="store_true")
    parser.add_argument("--soak-requests", type=int, default=0, help="requests for the memory soak (0: none)")
    parser.add_argument("--soak-model", type=Path, help="model for the soak (default: --model)")
    parser.add_argument("--env", nargs="*", default=[], help="extra RESNEST_X=value settings for our server")
    parser.add_argument("--out", type=Path, default=Path("bench/results"))
    parser.add_argument("--tag", default="cpu")
    args = parser.parse_args(argv)

    settings = {**BENCH_ENV, **dict(kv.split("=", 1) for kv in args.env)}
    with tempfile.TemporaryDirectory() as tmp:
        photos_dir = Path(tmp) / "photos"
        photos = bench_photos(photos_dir)
        card = ModelCard.from_metadata(
            ort.InferenceSession(str(args.model), providers=["CPUExecutionProvider"])
            .get_modelmeta()
            .custom_metadata_map
        )
        print("preprocessing cost ...", file=sys.stderr, flush=True)
        pre = preprocess_cost(photos, card)
        print("ceiling ...", file=sys.stderr, flush=True)
        ceil = ceiling(args.model, photos, args.ceiling_batches, args.ceiling_seconds)
        print(f"  {ceil['images_per_s']:.1f} img/s at batch {ceil['best_batch']}", file=sys.stderr, flush=True)
        result: dict[str, Any] = {"variant": card.variant, "model": str(args.model), "machine": describe(),
                                  "settings": settings, "preprocess": pre, "ceiling": ceil, "naive": []}  # fmt: skip
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        env = {
            **settings,
            "RESNEST_MODEL_PATH": str(args.model),
            "RESNEST_HOST": "127.0.0.1",
            "RESNEST_PORT": str(port),
            "RESNEST_GRPC_PORT": str(free_port()),  # not the default 8001: another server may hold it
        }
        print("our server ...", file=sys.stderr, flush=True)
        with server([sys.executable, "-m", "service"], env, url) as proc:
            result["providers"] = httpx.get(f"{url}/model").json()["providers"]
            result["ours"] = sweep(
                url, proc.pid, photos_dir, args.concurrency, args.images, args.duration, args.warmup, True
            )
            if args.soak_requests and not args.soak_model:
                result["soak"] = {"model": str(args.model), **soak(url, proc.pid, photos, args.soak_requests)}
        if args.soak_requests and args.soak_model:
            env["RESNEST_MODEL_PATH"] = str(args.soak_model)
            with server([sys.executable, "-m", "service"], env, url) as proc:
                result["soak"] = {"model": str(args.soak_model), **soak(url, proc.pid, photos, args.soak_requests)}
        if not args.skip_naive:
            print("naive server ...", file=sys.stderr, flush=True)
            naive_cmd = [sys.executable, "-m", "bench.naive_server", "--model", str(args.model), "--port", str(port)]
            with server(naive_cmd, {}, url) as proc:
                result["naive"] = sweep(url, proc.pid, photos_dir, args.concurrency, args.images, args.duration,
                                        args.warmup, False)  # fmt: skip
    write(result, args.out, args.tag)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
