"""Which ONNX Runtime execution providers can serve here, found out quietly before ORT is asked for them.

Asked for the CUDA EP on a machine without CUDA, ONNX Runtime fills the log with red errors (a library it
cannot load, a factory it cannot create) and then silently serves on the CPU; `preload_dlls()` adds a
"Failed to load" line per missing library. So the libraries the CUDA EP needs are looked for first, with
ctypes (which raises instead of printing), the EP is only requested when they are all there, and the
outcome is said once, in the caller's log. Shared by the service (service/core/request/inference.py) and the
export's parity run (export/sessions.py). Imports no torch.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import io
import logging
import site
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import onnxruntime as ort

log = logging.getLogger("providers")

CUDA, CPU = "CUDAExecutionProvider", "CPUExecutionProvider"
# ORT's logger severities: 2 warning (its default), 4 fatal (nothing it logs while a provider fails to start).
_ORT_WARNING, _ORT_FATAL = 2, 4
_CUDA_SUCCESS = 0


@dataclass(frozen=True)
class CudaProbe:
    """Whether the CUDA EP can start here, and if not, why (for the one start-up line and for errors)."""

    available: bool
    reason: str  # empty when available
    detail: str = ""  # what was looked for, or what is missing
    missing: tuple[str, ...] = ()


def _cuda_major() -> str:
    """The CUDA major version this onnxruntime build links against ("13" for onnxruntime-gpu 1.31)."""
    try:
        from onnxruntime.capi import build_and_package_info
    except ImportError:  # a build without it: assume the pinned onnxruntime-gpu's CUDA 13
        return "13"
    return str(getattr(build_and_package_info, "cuda_version", "") or "13").split(".")[0]


def required_libraries() -> tuple[str, ...]:
    """Shared libraries the CUDA EP loads, in dependency order: the driver, CUDA runtime, cuBLAS, cuRAND,
    cuDNN (libonnxruntime_providers_cuda.so's NEEDED entries, and cuDNN, which it opens at run time)."""
    major = _cuda_major()
    return (
        "libcuda.so.1",
        f"libcudart.so.{major}",
        f"libcublasLt.so.{major}",
        f"libcublas.so.{major}",
        "libcurand.so.10",
        "libcudnn.so.9",
    )


def _wheel_dirs() -> list[Path]:
    """Library folders of NVIDIA's pip wheels (nvidia/cu13/lib, nvidia/cudnn/lib, ...) in site-packages."""
    found: list[Path] = []
    for root in [*site.getsitepackages(), site.getusersitepackages(), *sys.path]:
        if root and Path(root).is_dir():
            found.extend(lib for lib in sorted(Path(root).glob("nvidia/*/lib")) if lib not in found)
    return found


def _load(name: str, dirs: Sequence[Path]) -> ctypes.CDLL | None:
    """Load `name` from a wheel folder or the system's search path; None when absent. Prints nothing.

    A library loaded here stays loaded, so the CUDA EP's own dlopen finds it by its soname (as with
    ORT's preload_dlls(), which loads the same libraries)."""
    for candidate in [*(str(d / name) for d in dirs if (d / name).is_file()), name]:
        with contextlib.suppress(OSError):
            return ctypes.CDLL(candidate)
    return None


def _visible_gpus(driver: ctypes.CDLL) -> tuple[int, str]:
    """(number of GPUs the driver sees, why none) through cuInit/cuDeviceGetCount, which print nothing."""
    try:
        status = driver.cuInit(0)
        if status != _CUDA_SUCCESS:
            return 0, f"the NVIDIA driver found no usable GPU (cuInit error {status})"
        count = ctypes.c_int(0)
        status = driver.cuDeviceGetCount(ctypes.byref(count))
    except AttributeError:  # not a CUDA driver after all
        return 0, "libcuda.so.1 is not an NVIDIA driver"
    if status != _CUDA_SUCCESS or count.value == 0:
        return 0, "the NVIDIA driver sees no GPU"
    return count.value, ""


@functools.cache
def probe_cuda() -> CudaProbe:
    """Whether the CUDA EP can start on this machine; loads its libraries when they are all present."""
    if CUDA not in ort.get_available_providers():
        return CudaProbe(False, "this onnxruntime build has no CUDA EP", f"onnxruntime {ort.__version__}")
    dirs = _wheel_dirs()
    names = required_libraries()
    loaded = {name: _load(name, dirs) for name in names}
    missing = tuple(name for name, lib in loaded.items() if lib is None)
    if len(missing) == len(names):
        return CudaProbe(False, "no CUDA libraries found", f"looked for {', '.join(names)}", missing)
    if missing:
        what = "no NVIDIA driver found" if "libcuda.so.1" in missing else "CUDA libraries missing"
        return CudaProbe(False, what, f"missing {', '.join(missing)}", missing)
    driver = loaded["libcuda.so.1"]
    assert driver is not None
    gpus, why = _visible_gpus(driver)
    if not gpus:
        return CudaProbe(False, why, "CUDA libraries present")
    if hasattr(ort, "preload_dlls"):
        # Everything it loads is present now, so it has nothing to complain about; what it prints anyway
        # goes to the debug log, not to stdout.
        out = io.StringIO()
        try:
            with contextlib.redirect_stdout(out):
                ort.preload_dlls()
        except Exception:  # the libraries are loaded already; the EP's own start is what decides
            log.debug("onnxruntime.preload_dlls() failed", exc_info=True)
        if out.getvalue().strip():
            log.debug("onnxruntime.preload_dlls(): %s", out.getvalue().strip())
    return CudaProbe(True, "")


@contextlib.contextmanager
def quiet_ort(enabled: bool = True) -> Iterator[None]:
    """Keep ONNX Runtime's own logger silent while a session starts, when a CUDA EP that may not start is
    asked for: its fallback is checked and reported by the caller (session.get_providers()), in one line."""
    if not enabled:
        yield
        return
    ort.set_default_logger_severity(_ORT_FATAL)
    try:
        yield
    finally:
        ort.set_default_logger_severity(_ORT_WARNING)


def describe(active: Sequence[str], probe: CudaProbe | None, device_id: int = 0) -> str:
    """The one start-up line: which providers serve and why (`probe` None: CPU chosen by configuration)."""
    if active and active[0] == CUDA:
        return f"serving on CUDA (GPU {device_id}), CPU for any op the CUDA EP lacks: {list(active)}"
    if probe is None:
        return "RESNEST_PROVIDERS=cpu: serving on CPU"
    if not probe.available:
        return f"{probe.reason}: serving on CPU ({probe.detail}; RESNEST_PROVIDERS=cpu skips the look)"
    return (
        "the CUDA EP did not start although its libraries and a GPU are present: serving on CPU "
        "(RESNEST_LOG_LEVEL=debug shows ONNX Runtime's reason)"
    )
