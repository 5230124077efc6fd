"""Worker threads named for the operating system too, so `top -H`, `ps -L` and profilers show what each is."""

from __future__ import annotations

import ctypes
import ctypes.util
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

_PR_SET_NAME = 15  # prctl(2); Linux keeps 15 bytes of the name
_libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True) if ctypes.util.find_library("c") else None


def _name_os_thread() -> None:
    """Give the calling thread's OS name its Python name (Python leaves it as the process's before 3.14)."""
    if _libc is not None and hasattr(_libc, "prctl"):
        _libc.prctl(_PR_SET_NAME, threading.current_thread().name.encode()[:15], 0, 0, 0)


def named_pool(workers: int, prefix: str, initializer: Callable[[], None] | None = None) -> ThreadPoolExecutor:
    """A thread pool whose threads carry `prefix` in their OS names as well (e.g. decode_0)."""

    def start() -> None:
        _name_os_thread()
        if initializer is not None:
            initializer()

    return ThreadPoolExecutor(workers, thread_name_prefix=prefix, initializer=start)
