"""Worker threads named for the operating system too, so `top -H`, `ps -L` and profilers show what each is."""

from __future__ import annotations

import ctypes
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

_PR_SET_NAME = 15  # prctl(2); Linux keeps 15 bytes of the name
# The process's own symbols (libc is loaded already): no library search, which would run ldconfig at start-up.
_libc = ctypes.CDLL(None, use_errno=True)


def _name_os_thread() -> None:
    """Give the calling thread's OS name its Python name (Python leaves it as the process's before 3.14)."""
    if hasattr(_libc, "prctl"):  # Linux only
        _libc.prctl(_PR_SET_NAME, threading.current_thread().name.encode()[:15], 0, 0, 0)


def named_pool(workers: int, prefix: str, initializer: Callable[[], None] | None = None) -> ThreadPoolExecutor:
    """A thread pool whose threads carry `prefix` in their OS names as well (e.g. decode_0)."""

    def start() -> None:
        _name_os_thread()
        if initializer is not None:
            initializer()

    return ThreadPoolExecutor(workers, thread_name_prefix=prefix, initializer=start)
