"""Fetching checkpoints: SHA-256 verification, an on-disk cache written atomically, progress on stderr."""

from __future__ import annotations

import hashlib
import os
import re
import sys
import tempfile
import urllib.parse
import urllib.request
from pathlib import Path
from typing import BinaryIO

_CHUNK = 1 << 20
# Official files are named "<model>-<first 8+ hex digits of their SHA-256>.<ext>".
_HASH_IN_NAME = re.compile(r"-([0-9a-f]{8,64})\.(?:pth|pt|bin|safetensors)$")


class ChecksumError(ValueError):
    """The bytes read do not have the SHA-256 they were promised to have."""


def default_cache_dir() -> Path:
    """$RESNEST_CACHE, else $XDG_CACHE_HOME/resnest-serve/checkpoints, else ~/.cache/..."""
    if env := os.environ.get("RESNEST_CACHE"):
        return Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "resnest-serve" / "checkpoints"


def expected_digest(name: str, sha256: str | None) -> str | None:
    """The full digest the user gave, else the hash prefix in an official file name, else None."""
    if sha256:
        digest = sha256.lower().removeprefix("sha256:")
        if not re.fullmatch(r"[0-9a-f]{64}", digest):
            raise ValueError(f"--sha256 must be 64 hex digits, got {sha256!r}")
        return digest
    match = _HASH_IN_NAME.search(name)
    return match.group(1) if match else None


def check_digest(actual: str, expected: str | None, what: str) -> None:
    """Raise ChecksumError unless `actual` starts with `expected` (a prefix from a file name counts)."""
    if expected is not None and not actual.startswith(expected):
        hint = (
            " (a '-<hex>' suffix in a file name is read as its hash prefix, as torch.hub does)"
            if len(expected) < 64
            else ""
        )
        raise ChecksumError(f"SHA-256 mismatch for {what}: expected {expected}..., got {actual}{hint}")


def sha256_file(path: Path) -> str:
    """The SHA-256 hex digest of a file, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


class _Progress:
    """A one-line byte counter on stderr, redrawn at most every percent."""

    def __init__(self, label: str, total: int | None, enabled: bool) -> None:
        self.label, self.total, self.enabled = label, total, enabled
        self.done, self._last = 0, -1

    def update(self, n: int) -> None:
        self.done += n
        if not self.enabled:
            return
        if self.total:
            pct = self.done * 100 // self.total
            if pct != self._last:
                self._last = pct
                sys.stderr.write(f"\r{self.label}: {pct:3d}% of {self.total / 1e6:.1f} MB")
        elif self.done // (10 * _CHUNK) != self._last:
            self._last = self.done // (10 * _CHUNK)
            sys.stderr.write(f"\r{self.label}: {self.done / 1e6:.1f} MB")

    def close(self) -> None:
        if self.enabled:
            sys.stderr.write("\n")


def _copy(src: BinaryIO, dst: BinaryIO, progress: _Progress) -> str:
    digest = hashlib.sha256()
    while chunk := src.read(_CHUNK):
        dst.write(chunk)
        digest.update(chunk)
        progress.update(len(chunk))
    return digest.hexdigest()


def download(
    url: str,
    *,
    sha256: str | None = None,
    cache_dir: Path | None = None,
    progress: bool = True,
    timeout: float = 60.0,
) -> tuple[Path, str]:
    """Download `url` into the cache (once) and return (path, sha256).

    The file is written under a temporary name and renamed only after its length and digest check out, so
    the cache never holds a partial or corrupt checkpoint. A cached file is re-verified on every use.
    """
    parsed = urllib.parse.urlparse(url)
    if parsed.scheme not in ("https", "http"):
        raise ValueError(f"checkpoint URL must be http(s), got {url!r}")
    name = Path(parsed.path).name or "checkpoint.pth"
    expected = expected_digest(name, sha256)
    # One folder per URL: two URLs ending in the same file name never share a cache entry.
    cache = (cache_dir or default_cache_dir()) / hashlib.sha256(url.encode()).hexdigest()[:16]
    cache.mkdir(parents=True, exist_ok=True)
    target = cache / name
    if target.exists():
        actual = sha256_file(target)
        try:
            check_digest(actual, expected, str(target))
            return target, actual
        except ChecksumError:
            target.unlink()  # a stale or tampered cache entry: fetch it again

    request = urllib.request.Request(url, headers={"User-Agent": "resnest-serve"})
    fd, tmp_name = tempfile.mkstemp(prefix=f".{name}.", suffix=".part", dir=cache)
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response, os.fdopen(fd, "wb") as out:
            length = response.headers.get("Content-Length")
            total = int(length) if length and length.isdigit() else None
            bar = _Progress(f"downloading {name}", total, progress)
            actual = _copy(response, out, bar)
            bar.close()
            if total is not None and bar.done != total:
                raise OSError(f"download of {url} truncated: {bar.done} of {total} bytes")
        check_digest(actual, expected, url)
        os.replace(tmp_name, target)
    except BaseException:
        Path(tmp_name).unlink(missing_ok=True)
        raise
    return target, actual
