"""Configuration: one env prefix, validation with clear errors, every setting documented in the README."""

from __future__ import annotations

import subprocess
import sys

import pytest
from pydantic import ValidationError

from service.core.settings import Settings, describe_settings
from tests.conftest import ROOT


def test_environment_variables_with_one_prefix(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RESNEST_MAX_BATCH_SIZE", "32")
    monkeypatch.setenv("RESNEST_PROVIDERS", "cpu")
    monkeypatch.setenv("RESNEST_API_KEY", "s3cr3t-value")
    monkeypatch.setenv("RESNEST_PAD_BATCHES", "true")
    s = Settings()
    assert (s.max_batch_size, s.providers, s.pad_batches) == (32, "cpu", True)
    assert s.api_key is not None and s.api_key.get_secret_value() == "s3cr3t-value"
    assert "s3cr3t" not in repr(s)  # secrets stay out of logs
    assert s.batch_shapes() == [1, 2, 4, 8, 16, 32]


@pytest.mark.parametrize(
    ("env", "field"),
    [
        ({"RESNEST_MAX_BATCH_SIZE": "0"}, "max_batch_size"),
        ({"RESNEST_PROVIDERS": "tpu"}, "providers"),
        ({"RESNEST_TOP_K_DEFAULT": "50", "RESNEST_TOP_K_MAX": "10"}, "top_k_default"),
        ({"RESNEST_MAX_IMAGES_PER_REQUEST": "100", "RESNEST_MAX_QUEUE_SIZE": "10"}, "max_images_per_request"),
        ({"RESNEST_REQUEST_TIMEOUT_S": "-1"}, "request_timeout_s"),
        ({"RESNEST_PORT": "70000"}, "port"),
        ({"RESNEST_MAX_UPLOAD_BYTES": "9000000", "RESNEST_MAX_BUFFERED_UPLOAD_BYTES": "8000000"}, "max_upload_bytes"),
        ({"RESNEST_DRAIN_GRACE_S": "30", "RESNEST_SHUTDOWN_TIMEOUT_S": "30"}, "shutdown_timeout_s"),
        ({"RESNEST_MAX_BATCH": "16"}, "RESNEST_MAX_BATCH"),
    ],
)
def test_invalid_settings_are_rejected_naming_the_field(
    monkeypatch: pytest.MonkeyPatch, env: dict[str, str], field: str
) -> None:
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    with pytest.raises((ValidationError, ValueError)) as exc:
        Settings.from_env()
    assert field in str(exc.value)


def test_batch_shapes_are_the_same_buckets_with_or_without_padding() -> None:
    # Padding rounds a batch up to a bucket, no padding cuts it down to one: warm-up covers exactly these.
    assert Settings(max_batch_size=5).batch_shapes() == [1, 2, 4, 5]
    assert Settings(max_batch_size=6, pad_batches=True).batch_shapes() == [1, 2, 4, 6]


def test_readme_documents_every_setting() -> None:
    readme = (ROOT / "README.md").read_text()
    missing = [f"RESNEST_{name.upper()}" for name in Settings.model_fields if f"RESNEST_{name.upper()}" not in readme]
    assert not missing, f"README lacks {missing}"
    rows = [line for line in describe_settings().splitlines() if line.startswith("  RESNEST_")]
    assert len(rows) == len(Settings.model_fields)


def test_service_never_imports_torch() -> None:
    code = (
        "import sys; import service.http.app, service.__main__, service.core.request.inference, imaging.transforms; "
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'models', 'export', 'onnx')); "
        "assert not bad, bad"
    )
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr


def test_gpu_path_settings_and_the_decode_pool_following_the_machine(monkeypatch: pytest.MonkeyPatch) -> None:
    import os

    from service.core.settings import available_cpus

    assert Settings().decode_threads == available_cpus() == len(os.sched_getaffinity(0))
    defaults = Settings()
    assert defaults.io_binding is True and defaults.cuda_graphs is False and defaults.resize_reducing_gap is None
    monkeypatch.setenv("RESNEST_CUDA_GRAPHS", "true")
    monkeypatch.setenv("RESNEST_RESIZE_REDUCING_GAP", "2.0")
    monkeypatch.setenv("RESNEST_IO_BINDING", "false")
    env = Settings.from_env()
    assert env.cuda_graphs is True and env.resize_reducing_gap == 2.0 and env.io_binding is False
    with pytest.raises(ValidationError):
        Settings(resize_reducing_gap=0.5)  # Pillow needs a gap of at least 1
