"""Start-up checks of the settings against the host they run on: the upload spool's disk and the memory limit.

The settings validate against each other on their own (service/core/settings.py); these need the machine, and the
memory check needs the loaded model, so the app runs it after warm-up, before it reports ready.
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path

from .settings import Settings

_CGROUP_LIMITS = (Path("/sys/fs/cgroup/memory.max"), Path("/sys/fs/cgroup/memory/memory.limit_in_bytes"))
# cgroup v1 reports "no limit" as a page-aligned 2**63 - 1.
_NO_LIMIT = 1 << 60


class LimitsError(ValueError):
    """The settings cannot be honoured on this host; the message names the settings to change."""


def memory_limit_bytes() -> int | None:
    """The container's memory limit (cgroup v2 or v1), or None when there is none."""
    for path in _CGROUP_LIMITS:
        try:
            text = path.read_text().strip()
        except OSError:
            continue
        if text == "max" or not text.isdigit() or int(text) >= _NO_LIMIT:
            return None
        return int(text)
    return None


def rss_bytes() -> int:
    """This process's resident memory now (Linux), or 0 where /proc is not available."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def check_spool(settings: Settings, spool_dir: str | None = None) -> None:
    """Uploads past 1 MiB a part spool to the temp dir: it must have room for every body admitted at once."""
    folder = spool_dir or tempfile.gettempdir()
    free = shutil.disk_usage(folder).free
    if settings.max_buffered_upload_bytes > free:
        raise LimitsError(
            f"RESNEST_MAX_BUFFERED_UPLOAD_BYTES ({settings.max_buffered_upload_bytes}) exceeds the free space in the "
            f"upload spool {folder} ({free} bytes): lower it, or give TMPDIR more room"
        )


def check_memory(settings: Settings, queues_bytes: Sequence[int], limit: int | None, model_rss: int) -> None:
    """The models as loaded, the request path's worst case and every model version's queue (`queues_bytes`,
    each at its fullest: Batching.memory_bytes) must fit the limit."""
    if limit is None:
        return
    need = model_rss + settings.request_memory_bytes() + sum(queues_bytes)
    if need > limit:
        raise LimitsError(
            f"worst-case memory {need >> 20} MiB (models {model_rss >> 20} MiB as loaded, plus "
            f"RESNEST_DECODE_THREADS x RESNEST_MAX_IMAGE_PIXELS decodes, {len(queues_bytes)} queue(s) of tensors, "
            f"the uploads' in-memory parts and the gRPC messages being read) exceeds the memory limit of "
            f"{limit >> 20} MiB: lower RESNEST_DECODE_THREADS, RESNEST_MAX_IMAGE_PIXELS or RESNEST_MAX_QUEUE_SIZE "
            "(or the models' max_queue_size), or raise the limit"
        )
