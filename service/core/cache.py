"""The response cache: a model's outputs for an input it has already seen, in process or shared through Redis.

What is cached is one image's model outputs (its logits and its embedding, float32), not a protocol's answer:
top-k, softmax, normalisation and the answer's encoding are applied after the cache as after the model, so
one entry answers /classify, /embed and the OIP over HTTP and gRPC alike, with any top_k, and gives the
bit-identical answer the model would. The key is everything that changes those outputs: the model's name,
its version, the digest of its model card (weights, precision, preprocessing, export), and the digest of the
input (an encoded file's bytes, or a client's tensor with its dtype and shape). A reload or unload of a
model version drops its entries. Off by default (Triton's and MLServer's caches are opt-in too).

Redis is a cache, never a dependency: a lookup or store that fails or takes longer than
RESNEST_CACHE_TIMEOUT_MS counts as a miss (the model answers), and the cache is skipped for a second before
it is tried again, so an outage costs at most one timeout per second, not one per request.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import struct
import time
import weakref
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

from modelcard import ModelCard

from .metrics import Metrics
from .settings import Settings

if TYPE_CHECKING:
    from .repository.registry import ServedModel

log = logging.getLogger("service.cache")

PREFIX = "resnest:v1:"
# After a Redis failure, how long lookups skip it (answered by the model) before trying again.
RETRY_AFTER_S = 1.0
# An entry's bytes beyond its arrays: the key, the tuple and the dictionary slot (a measured order of size).
ENTRY_OVERHEAD = 200
_HEADER = struct.Struct("<II")  # the logits' and the embedding's lengths, before their float32 bytes
_PREFIXES: weakref.WeakKeyDictionary[ServedModel, str] = weakref.WeakKeyDictionary()


@dataclass(frozen=True)
class Entry:
    """One image's model outputs."""

    logits: np.ndarray  # (classes,) float32; empty for a headless backbone
    embedding: np.ndarray  # (dim,) float32

    @property
    def nbytes(self) -> int:
        return self.logits.nbytes + self.embedding.nbytes

    def encode(self) -> bytes:
        return _HEADER.pack(self.logits.size, self.embedding.size) + self.logits.tobytes() + self.embedding.tobytes()

    @classmethod
    def decode(cls, data: bytes) -> Entry:
        n, d = _HEADER.unpack_from(data)
        values = np.frombuffer(data, dtype=np.float32, offset=_HEADER.size)
        if values.size != n + d:
            raise ValueError(f"a cached entry of {values.size} values, not {n} + {d}")
        return cls(values[:n], values[n:])


def model_prefix(name: str, version: int) -> str:
    """Every key of a model version starts with this (what a reload or unload drops)."""
    return f"{PREFIX}{name}/{version}/"


def card_digest(card: ModelCard) -> str:
    """What the model file is, as far as its outputs go: its card (weights, precision, preprocessing, export)."""
    return hashlib.sha256(json.dumps(card.to_metadata(), sort_keys=True).encode()).hexdigest()[:16]


def key_prefix(served: ServedModel) -> str:
    """The start of every key of a served model version: name, version and what its file is (memoised)."""
    prefix = _PREFIXES.get(served)
    if prefix is None:
        prefix = _PREFIXES[served] = f"{model_prefix(served.name, served.version)}{card_digest(served.model.card)}/"
    return prefix


def file_keys(prefix: str, files: Sequence[bytes]) -> list[str]:
    """Keys of encoded image files: their bytes' digest (the same file is the same image)."""
    return [f"{prefix}file:{hashlib.blake2b(data, digest_size=20).hexdigest()}" for data in files]


def tensor_keys(prefix: str, batch: np.ndarray) -> list[str]:
    """Keys of a client's preprocessed tensors, one per row: dtype, shape and bytes."""
    kind = f"{prefix}tensor:{batch.dtype.str}:{'x'.join(map(str, batch.shape[1:]))}:"
    return [kind + hashlib.blake2b(row.tobytes(), digest_size=20).hexdigest() for row in batch]


class Store(Protocol):
    """Where entries live: this process, or Redis."""

    async def get(self, keys: list[str]) -> list[Entry | None]: ...
    async def put(self, entries: dict[str, Entry]) -> None: ...
    async def drop(self, prefix: str) -> None: ...
    async def close(self) -> None: ...


class MemoryStore:
    """Least recently used entries, at most `limit` bytes of them."""

    def __init__(self, limit: int, metrics: Metrics) -> None:
        self.limit, self.metrics = limit, metrics
        self._entries: OrderedDict[str, Entry] = OrderedDict()
        self.bytes = 0

    async def get(self, keys: list[str]) -> list[Entry | None]:
        found: list[Entry | None] = []
        for key in keys:
            entry = self._entries.get(key)
            if entry is not None:
                self._entries.move_to_end(key)
            found.append(entry)
        return found

    async def put(self, entries: dict[str, Entry]) -> None:
        for key, entry in entries.items():
            size = entry.nbytes + ENTRY_OVERHEAD
            if size > self.limit:
                continue
            old = self._entries.pop(key, None)
            if old is not None:
                self.bytes -= old.nbytes + ENTRY_OVERHEAD
            self._entries[key] = entry
            self.bytes += size
            while self.bytes > self.limit:
                _, evicted = self._entries.popitem(last=False)
                self.bytes -= evicted.nbytes + ENTRY_OVERHEAD
        self.metrics.cache_bytes.set(self.bytes)

    async def drop(self, prefix: str) -> None:
        for key in [k for k in self._entries if k.startswith(prefix)]:
            self.bytes -= self._entries.pop(key).nbytes + ENTRY_OVERHEAD
        self.metrics.cache_bytes.set(self.bytes)

    async def close(self) -> None:
        self._entries.clear()
        self.bytes = 0


class RedisStore:
    """Entries in Redis (as Triton's Redis cache), shared by every replica, each with a time to live."""

    def __init__(self, url: str, ttl_s: int, timeout_s: float, metrics: Metrics) -> None:
        import redis.asyncio as redis

        self.ttl_s, self.timeout_s, self.metrics = ttl_s, timeout_s, metrics
        self._client: Any = redis.Redis.from_url(
            url, socket_timeout=timeout_s, socket_connect_timeout=timeout_s, retry_on_timeout=False
        )
        self._down_until = 0.0  # monotonic time before which Redis is not tried (it just failed)
        self._url = url

    def _available(self) -> bool:
        return time.monotonic() >= self._down_until

    def _failed(self, what: str, exc: BaseException) -> None:
        self.metrics.cache_errors.inc()
        if self._available():  # once per outage, not once per request
            log.warning("the response cache at %s failed a %s (%s); the model answers, retrying in %.0fs",
                        self._url, what, type(exc).__name__, RETRY_AFTER_S)  # fmt: skip
        self._down_until = time.monotonic() + RETRY_AFTER_S

    async def get(self, keys: list[str]) -> list[Entry | None]:
        if not self._available():
            return [None] * len(keys)
        try:
            values = await asyncio.wait_for(self._client.mget(keys), self.timeout_s)
        except Exception as exc:  # any failure of a cache is a miss
            self._failed("lookup", exc)
            return [None] * len(keys)
        found: list[Entry | None] = []
        for value in values:
            try:
                found.append(None if value is None else Entry.decode(value))
            except (ValueError, struct.error):
                found.append(None)  # another writer's garbage under our prefix: a miss, overwritten on store
        return found

    async def put(self, entries: dict[str, Entry]) -> None:
        if not entries or not self._available():
            return
        try:
            async with self._client.pipeline(transaction=False) as pipe:
                for key, entry in entries.items():
                    pipe.set(key, entry.encode(), ex=self.ttl_s)
                await asyncio.wait_for(pipe.execute(), self.timeout_s)
        except Exception as exc:
            self._failed("store", exc)

    async def drop(self, prefix: str) -> None:
        # A reload is rare and an operator's act: no timeout short enough to leave stale entries behind.
        try:
            batch: list[bytes] = []
            async for key in self._client.scan_iter(match=prefix + "*", count=1000):
                batch.append(key)
                if len(batch) >= 1000:
                    await self._client.unlink(*batch)
                    batch.clear()
            if batch:
                await self._client.unlink(*batch)
        except Exception as exc:
            self._failed("drop", exc)

    async def close(self) -> None:
        await self._client.aclose()


class ResponseCache:
    """The cache the request path consults; None of it exists unless RESNEST_CACHE_BYTES or _URL is set."""

    def __init__(self, store: Store, metrics: Metrics) -> None:
        self.store, self.metrics = store, metrics

    @classmethod
    def from_settings(cls, settings: Settings, metrics: Metrics) -> ResponseCache | None:
        if settings.cache_url is not None:
            store: Store = RedisStore(settings.cache_url, settings.cache_ttl_s, settings.cache_timeout_ms / 1000,
                                      metrics)  # fmt: skip
        elif settings.cache_bytes > 0:
            store = MemoryStore(settings.cache_bytes, metrics)
        else:
            return None
        return cls(store, metrics)

    async def lookup(self, model: str, keys: list[str]) -> list[Entry | None]:
        """Each key's entry, or None; counted as hits and misses per image."""
        found = await self.store.get(keys)
        hits = sum(entry is not None for entry in found)
        if hits:
            self.metrics.cache_hits.labels(model).inc(hits)
        if hits < len(keys):
            self.metrics.cache_misses.labels(model).inc(len(keys) - hits)
        return found

    async def store_outputs(self, keys: list[str], logits: np.ndarray, embedding: np.ndarray) -> None:
        """The model's outputs for the rows of `keys` (copies: the answer's arrays stay the request's own)."""
        await self.store.put(
            {key: Entry(logits[i].copy(), embedding[i].copy()) for i, key in enumerate(keys)}
        )  # fmt: skip

    async def drop(self, name: str, version: int) -> None:
        """Forget a model version's entries (its reload or unload)."""
        await self.store.drop(model_prefix(name, version))

    async def close(self) -> None:
        await self.store.close()
