"""The batch job (batch/): its answers are the service's for the same files, an interrupted job resumes with
every input written exactly once, and its pieces (inputs, ledger, limits) hold without Ray."""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import psutil
import pyarrow.parquet as pq
import pytest
from PIL import Image

from batch.ledger import JOB_FILE, TMP_PREFIX
from bench.forms import files
from service.http.app import create_app
from tests.conftest import ROOT, app_client, jpeg, run, settings

# Every Ray process a job starts lives under this folder (RAY_TMPDIR), so a test can prove none outlived it.
# Short on purpose: Ray's Unix sockets live below it and a socket path has at most 107 bytes.
RAY_TMP_PREFIX = "rb-"


@pytest.fixture
def ray_env() -> Iterator[dict[str, str]]:
    """The job's environment: no usage statistics, and a Ray temp folder of its own, checked for leftovers."""
    tmp = tempfile.mkdtemp(prefix=RAY_TMP_PREFIX, dir="/tmp")
    yield {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "RAY_TMPDIR": tmp}
    assert_no_ray_left(tmp)


def ray_processes(tmp: str) -> list[psutil.Process]:
    """Processes of the Ray that the job with this RAY_TMPDIR started (by their environment or arguments)."""
    found = []
    for proc in psutil.process_iter(["cmdline", "environ", "status"]):
        try:
            # A zombie has exited (its parent, a killed raylet, is gone and init has not reaped it yet).
            if proc.info["status"] == psutil.STATUS_ZOMBIE:
                continue
            if (proc.info["environ"] or {}).get("RAY_TMPDIR") == tmp or tmp in " ".join(proc.info["cmdline"] or []):
                found.append(proc)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return found


def assert_no_ray_left(tmp: str, timeout: float = 20.0) -> None:
    """Every Ray process of the job is gone (given time to exit); any left is killed, and the test fails."""
    deadline = time.monotonic() + timeout
    while (left := ray_processes(tmp)) and time.monotonic() < deadline:
        time.sleep(0.2)
    for proc in left:
        proc.kill()
    assert not left, f"Ray processes outlived the job: {[p.info['cmdline'] for p in left]}"


def job(args: list[str], env: dict[str, str], timeout: float = 120) -> subprocess.CompletedProcess[str]:
    """`python -m batch ARGS` to completion."""
    return subprocess.run([sys.executable, "-m", "batch", *args], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=timeout)  # fmt: skip


def rows(out: Path) -> list[dict[str, Any]]:
    """Every committed row of the output folder (as readers see it: the dataset of its visible files)."""
    return pq.read_table(out).to_pylist()


def encoded(img: Image.Image, fmt: str, **params: Any) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **params)
    return buf.getvalue()


def service_answers(model: Path, files_: dict[str, bytes], **limits: Any) -> dict[str, dict[str, Any]]:
    """Per file, sent alone: the service's /classify?top_k=5 and /embed?normalize=true answers (or its error)."""
    app = create_app(settings(model_path=str(model), providers="cpu", **limits))
    answers: dict[str, dict[str, Any]] = {}

    async def main() -> None:
        async with app_client(app) as client:
            for name, data in files_.items():
                c = await client.post("/classify?top_k=5", files=files(data))
                e = await client.post("/embed?normalize=true", files=files(data))
                answers[name] = {"classify": (c.status_code, c.json()), "embed": (e.status_code, e.json())}

    run(main())
    return answers


# --- the job equals the service ----------------------------------------------------------------------------------


def test_job_answers_are_the_services_for_the_same_files(tiny_onnx: Path, photos: list[tuple[str, bytes]],
                                                        tmp_path: Path, ray_env: dict[str, str]) -> None:  # fmt: skip
    images = tmp_path / "images"
    (images / "nested").mkdir(parents=True)
    photo = Image.open(io.BytesIO(photos[0][1])).convert("RGB")
    rotated = photo.getexif()
    rotated[0x0112] = 6  # EXIF orientation: rotate 90° clockwise to display
    noise = np.random.default_rng(0).integers(0, 256, (700, 700, 3), dtype=np.uint8)
    corpus = {
        **{f"photo-{i}-{Path(name).name}": data for i, (name, data) in enumerate(photos[:5])},
        "grey.jpg": encoded(photo.convert("L"), "JPEG", quality=90),
        "nested/cmyk.jpg": encoded(photo.convert("CMYK"), "JPEG", quality=90),
        "nested/exif-rotated.jpg": encoded(photo, "JPEG", quality=90, exif=rotated),
        "palette.gif": encoded(photo.convert("P"), "GIF"),
        "truncated.jpg": jpeg((400, 300))[:1500],
        "not-an-image.jpg": b"this is not an image at all",
        "empty.png": b"",
        "too-many-pixels.png": encoded(Image.new("RGB", (2600, 2000), (10, 20, 30)), "PNG"),  # 5.2 MP
        "too-many-bytes.png": encoded(Image.fromarray(noise), "PNG", compress_level=0),  # 1.47 MB of noise
    }
    for name, data in corpus.items():
        (images / name).write_bytes(data)
    (images / "README.txt").write_text("not an input: a folder yields image files only")
    limits = {"max_image_pixels": 5_000_000, "max_upload_bytes": 2**20}
    out = tmp_path / "out"
    done = job([str(images), "-o", str(out), "-m", str(tiny_onnx), "--normalize", "--batch-size", "4",
                "--num-cpus", "2", "--max-image-pixels", "5000000", "--max-file-bytes", str(2**20)],
               ray_env)  # fmt: skip
    assert done.returncode == 0, done.stderr
    got = {Path(r["path"]).relative_to(images).as_posix(): r for r in rows(out)}
    assert sorted(got) == sorted(corpus)
    want = service_answers(tiny_onnx, corpus, **limits)
    errors = 0
    for name, row in got.items():
        (c_status, c_body), (e_status, e_body) = want[name]["classify"], want[name]["embed"]
        if c_status != 200:
            errors += 1
            assert row["status"] == "error" and e_status == c_status, name
            # The service names the image by its place in the request; the body's size is the request's own.
            prefix = "" if row["error_code"] == "payload_too_large" else "image 0: "
            assert (row["error_code"], prefix + row["error"]) == (c_body["error"]["code"], c_body["error"]["message"])
            assert row["indices"] is None and row["embedding"] is None
            continue
        (answer,) = c_body["results"]
        assert row["status"] == "ok" and row["error"] is None, name
        assert row["indices"] == [p["index"] for p in answer["predictions"]], name
        assert row["labels"] == [p["label"] for p in answer["predictions"]], name
        np.testing.assert_allclose(row["scores"], [p["score"] for p in answer["predictions"]], rtol=0, atol=1e-6)
        np.testing.assert_allclose(row["embedding"], e_body["results"][0]["embedding"], rtol=0, atol=1e-5)
    codes = {r["error_code"] for r in got.values() if r["status"] == "error"}
    assert errors == 5 and codes == {"invalid_image", "image_too_large", "payload_too_large"}
    record = json.loads((out / JOB_FILE).read_text())
    assert record["counts"] == {"inputs": len(corpus), "done": len(corpus), "ok": len(corpus) - 5, "error": 5,
                                "parts": 1}  # fmt: skip
    assert record["model"]["variant"] == "resnest14d" and record["task"] == "both" and record["providers"] == [
        "CPUExecutionProvider"]  # fmt: skip
    assert record["runs"][-1]["images"] == len(corpus) and record["throughput"]["images_per_s"] > 0
    # Run again: everything is done, nothing is redone, and Ray is not even started.
    again = job([str(images), "-o", str(out), "-m", str(tiny_onnx), "--normalize", "--batch-size", "4"], ray_env)
    assert again.returncode == 0 and f"{len(corpus)} already done" in again.stderr, again.stderr
    assert len(rows(out)) == len(corpus)
    # The same folder with another model's answers is refused, not mixed.
    other = job([str(images), "-o", str(out), "-m", str(tiny_onnx), "--batch-size", "4"], ray_env)
    assert other.returncode == 2 and "another job's results" in other.stderr


# --- interrupted and resumed --------------------------------------------------------------------------------------


def parts(out: Path) -> list[Path]:
    return sorted(out.glob("part-*.parquet"))


def start_job(args: list[str], env: dict[str, str]) -> subprocess.Popen[str]:
    # A session of its own, so SIGKILL can take the job's whole process group (driver and the Ray it started)
    # at once, as a lost machine would.
    return subprocess.Popen([sys.executable, "-m", "batch", *args], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)  # fmt: skip


def wait_for_parts(proc: subprocess.Popen[str], out: Path, more_than: int, timeout: float = 90) -> None:
    """Until the running job has committed more than `more_than` parts; it must still be running then."""
    deadline = time.monotonic() + timeout
    while len(parts(out)) <= more_than:
        assert proc.poll() is None, f"the job ended before it could be interrupted: {proc.communicate()[1]}"
        assert time.monotonic() < deadline, "no part committed in time"
        time.sleep(0.02)


def test_a_killed_job_resumes_and_writes_every_input_exactly_once(tiny_onnx: Path, tmp_path: Path,
                                                                  ray_env: dict[str, str]) -> None:  # fmt: skip
    images = tmp_path / "images"
    images.mkdir()
    names = [f"{i:03d}.jpg" for i in range(120)]
    for i, name in enumerate(names):
        (images / name).write_bytes(jpeg((48, 40), (i, 255 - i, 7 * i % 256)))
    (images / "corrupt.jpg").write_bytes(b"\xff\xd8\xff\xe0 broken")
    inputs = {str(images / n) for n in [*names, "corrupt.jpg"]}
    out = tmp_path / "out"
    # Small batches and parts, so the job is caught with some parts committed and many inputs still to go.
    args = [str(images), "-o", str(out), "-m", str(tiny_onnx), "--batch-size", "2", "--rows-per-file", "4",
            "--flush-seconds", "0.5", "--num-cpus", "2", "--progress-seconds", "0.5"]  # fmt: skip

    # 1. SIGINT (Ctrl-C): what has arrived is committed, the record says interrupted, the exit status is 130.
    proc = start_job(args, ray_env)
    wait_for_parts(proc, out, 0)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    first = len(rows(out))
    record = json.loads((out / JOB_FILE).read_text())
    assert record["state"] == "interrupted" and record["counts"]["done"] == first
    assert 0 < first < len(inputs), f"interrupted after {first} of {len(inputs)} rows"

    # 2. SIGKILL of the whole job mid-run: nothing is flushed; only whole parts count as done.
    proc = start_job(args, ray_env)
    wait_for_parts(proc, out, len(parts(out)))
    os.killpg(proc.pid, signal.SIGKILL)
    proc.communicate(timeout=30)
    # The local Ray dies with its driver: its raylet with the process group, its workers once they see the
    # raylet gone (they poll for it, so give them a minute).
    assert_no_ray_left(ray_env["RAY_TMPDIR"], timeout=60)
    second = len(rows(out))
    assert first < second < len(inputs), f"killed after {second} of {len(inputs)} rows"
    # A crash during a write leaves at most a hidden temporary file: readers skip it, the next run removes it.
    half = out / f"{TMP_PREFIX}deadbeef-part-000999.parquet"
    half.write_bytes(pq.ParquetFile.__name__.encode() + b"PAR1 half-written")
    assert len(rows(out)) == second

    # 3. The same command finishes the job: every input exactly once, nothing written twice, nothing lost.
    done = job(args, ray_env)
    assert done.returncode == 0, done.stderr
    assert f"{second} already done" in done.stderr and "half-written" in done.stderr, done.stderr
    assert not half.exists() and not list(out.glob(f"{TMP_PREFIX}*"))
    paths = [r["path"] for r in rows(out)]
    assert len(paths) == len(set(paths)) == len(inputs) and set(paths) == inputs
    record = json.loads((out / JOB_FILE).read_text())
    assert record["state"] == "done" and record["counts"]["done"] == len(inputs) and record["counts"]["error"] == 1
    assert [r["state"] for r in record["runs"]] == ["interrupted", "done"]  # the killed run left no record
    assert record["runs"][-1]["images"] == len(inputs) - second
    # Progress lines were printed along the way (images done, rate, errors, time left).
    assert "img/s" in done.stderr and "errors" in done.stderr and "left" in done.stderr
