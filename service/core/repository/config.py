"""A model's configuration in Triton's own `config.pbtxt` fields, with the service's settings as defaults.

Of a config.pbtxt this service reads `version_policy` (`latest { num_versions: N }`, `all {}`, `specific {
versions: [..] }`), `max_batch_size`, and `dynamic_batching { max_queue_delay_microseconds,
preferred_batch_size, default_queue_policy { max_queue_size } }`; the rest of Triton's fields (inputs,
outputs, instance groups) describe what the ONNX file already says and are left alone. The file is read as
protobuf text format by a small parser of its own, so the core needs no protobuf.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

from ..settings import Settings, powers_of_two_below, queue_memory_bytes

# Protobuf text format's tokens: space, comments ('#' to the end of the line), strings, numbers and names, and
# its punctuation.
_TOKEN = re.compile(r'\s+|#[^\n]*|"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'|[-+]?[\w.]+|[{}\[\]:,;<>]')
_OPEN = {"{": "}", "<": ">"}
Fields = dict[str, list[Any]]


class ConfigError(ValueError):
    """A config.pbtxt that cannot be read, or asks for what this service cannot do; the message says which."""


def _tokens(text: str) -> list[str]:
    out, pos = [], 0
    while pos < len(text):
        found = _TOKEN.match(text, pos)
        if found is None:
            raise ConfigError(f"cannot read the text at {text[pos : pos + 20]!r}")
        token = found.group()
        if not token.isspace() and not token.startswith("#"):
            out.append(token)
        pos = found.end()
    return out


def _scalar(token: str) -> Any:
    if token[0] in "\"'":
        return token[1:-1]
    for kind in (int, float):
        try:
            return kind(token)
        except ValueError:
            pass
    return token  # an enum value or a bare word (true, KIND_GPU)


def _message(tokens: list[str], pos: int, end: str | None) -> tuple[Fields, int]:
    """The fields from `pos` up to the token `end` (None: the end of the file); repeated names collect."""
    fields: Fields = {}
    while pos < len(tokens) and tokens[pos] != end:
        name = tokens[pos]
        pos += 1
        if pos < len(tokens) and tokens[pos] == ":":
            pos += 1
        if pos >= len(tokens):
            raise ConfigError(f"field {name!r} has no value")
        token = tokens[pos]
        if token in _OPEN:
            value, pos = _message(tokens, pos + 1, _OPEN[token])
            values: list[Any] = [value]
        elif token == "[":
            values, pos = _list(tokens, pos + 1)
        else:
            values = [_scalar(token)]
        pos += 1
        fields.setdefault(name, []).extend(values)
        while pos < len(tokens) and tokens[pos] in (",", ";"):
            pos += 1
    if end is not None and pos >= len(tokens):
        raise ConfigError(f"a message is not closed with {end!r}")
    return fields, pos


def _list(tokens: list[str], pos: int) -> tuple[list[Any], int]:
    values: list[Any] = []
    while pos < len(tokens) and tokens[pos] != "]":
        if tokens[pos] in _OPEN:
            value, pos = _message(tokens, pos + 1, _OPEN[tokens[pos]])
            values.append(value)
        elif tokens[pos] != ",":
            values.append(_scalar(tokens[pos]))
        pos += 1
    if pos >= len(tokens):
        raise ConfigError("a list is not closed with ']'")
    return values, pos


def parse_text_format(text: str) -> Fields:
    """Protobuf text format as nested dicts, each field a list of its values (messages are dicts)."""
    fields, _ = _message(_tokens(text), 0, None)
    return fields


def _one(fields: Fields, name: str, kind: type, default: Any = None) -> Any:
    values = fields.get(name)
    if not values:
        return default
    if len(values) > 1 or not isinstance(values[0], kind) or isinstance(values[0], bool):
        raise ConfigError(f"{name} must be one {kind.__name__}, got {values}")
    return values[0]


@dataclass(frozen=True)
class VersionPolicy:
    """Which of a model's versions to serve: the latest N, all, or the listed ones."""

    kind: str = "latest"
    num_versions: int = 1
    versions: tuple[int, ...] = ()

    def select(self, available: list[int]) -> list[int]:
        """The versions to serve, ascending."""
        ordered = sorted(available)
        if self.kind == "all":
            return ordered
        if self.kind == "specific":
            return [v for v in ordered if v in self.versions]
        return ordered[-self.num_versions :]

    def describe(self) -> dict[str, object]:
        """Triton's JSON form of the policy (model configuration)."""
        if self.kind == "all":
            return {"all": {}}
        if self.kind == "specific":
            return {"specific": {"versions": list(self.versions)}}
        return {"latest": {"num_versions": self.num_versions}}

    @classmethod
    def parse(cls, fields: Fields) -> VersionPolicy:
        """The `version_policy` message's policy; latest 1 when there is none."""
        policy = _one(fields, "version_policy", dict)
        if policy is None:
            return cls()
        if len(policy) != 1 or next(iter(policy)) not in ("latest", "all", "specific"):
            raise ConfigError(f"unsupported version_policy {policy}: use latest {{ num_versions: N }}, all {{}} or "
                              "specific { versions: [..] }")  # fmt: skip
        kind, (body,) = next(iter(policy.items()))
        if kind == "all":
            return cls("all")
        if kind == "latest":
            n = _one(body, "num_versions", int, 1)
            if n < 1:
                raise ConfigError("version_policy latest needs num_versions >= 1")
            return cls("latest", num_versions=n)
        versions = tuple(body.get("versions", []))
        if not versions or not all(isinstance(v, int) and not isinstance(v, bool) for v in versions):
            raise ConfigError("version_policy specific lists no versions")
        return cls("specific", versions=versions)


@dataclass(frozen=True)
class Batching:
    """How one model version's batcher forms batches, and the shapes its warm-up covers."""

    max_batch_size: int
    preferred_batch_sizes: tuple[int, ...]
    max_queue_delay_ms: float
    max_queue_size: int
    pad: bool

    @classmethod
    def defaults(cls, settings: Settings) -> Batching:
        """The settings' batching (RESNEST_MAX_BATCH_SIZE and friends): every model's unless its config says."""
        return cls(settings.max_batch_size, tuple(powers_of_two_below(settings.max_batch_size)),
                   settings.max_queue_delay_ms, settings.max_queue_size, settings.pad_batches)  # fmt: skip

    def shapes(self) -> list[int]:
        """Every batch size the batcher can hand to the model (what warm-up must cover): the preferred sizes
        and the largest. Batches are padded up to one (`pad`) or cut down to one, so no other shape runs."""
        return sorted({*self.preferred_batch_sizes, self.max_batch_size})

    def memory_bytes(self, input_size: int) -> int:
        """Host memory of this batcher's queued input tensors at their most."""
        return queue_memory_bytes(self.max_queue_size, self.max_batch_size, input_size)

    def to_triton(self) -> dict[str, Any]:
        """Triton's JSON form: max_batch_size and dynamic_batching, as in force."""
        return {
            "max_batch_size": self.max_batch_size,
            "dynamic_batching": {
                "preferred_batch_size": self.shapes(),
                "max_queue_delay_microseconds": int(self.max_queue_delay_ms * 1000),
                "default_queue_policy": {"max_queue_size": self.max_queue_size},
            },
        }


@dataclass(frozen=True)
class ModelConfig:
    """What a model folder's config.pbtxt asks for: its version policy, and batching over the settings'."""

    version_policy: VersionPolicy = field(default_factory=VersionPolicy)
    max_batch_size: int | None = None
    preferred_batch_sizes: tuple[int, ...] | None = None
    max_queue_delay_ms: float | None = None
    max_queue_size: int | None = None

    @classmethod
    def parse(cls, text: str) -> ModelConfig:
        """A config.pbtxt's text; ConfigError when it cannot be read or asks for what cannot be served."""
        fields = parse_text_format(text)
        dynamic = _one(fields, "dynamic_batching", dict, {})
        queue_policy = _one(dynamic, "default_queue_policy", dict, {})
        max_batch = _one(fields, "max_batch_size", int)
        if max_batch is not None and not 1 <= max_batch <= 1024:
            raise ConfigError(f"max_batch_size {max_batch}: this service batches every model, 1 to 1024 images")
        preferred = dynamic.get("preferred_batch_size")
        if preferred is not None and not all(isinstance(p, int) and not isinstance(p, bool) and p >= 1
                                             for p in preferred):  # fmt: skip
            raise ConfigError(f"preferred_batch_size {preferred} must list positive integers")
        delay = _one(dynamic, "max_queue_delay_microseconds", int)
        if delay is not None and not 0 <= delay <= 1_000_000:
            raise ConfigError(f"max_queue_delay_microseconds {delay} must be 0 to 1000000")
        queue = _one(queue_policy, "max_queue_size", int)
        if queue is not None and queue < 1:
            raise ConfigError(f"max_queue_size {queue} must be at least 1 (0, Triton's unbounded, is not served)")
        return cls(VersionPolicy.parse(fields), max_batch, None if preferred is None else tuple(preferred),
                   None if delay is None else delay / 1000, queue)  # fmt: skip

    def batching(self, settings: Settings) -> Batching:
        """The batching in force: this config's fields over the settings' defaults; ConfigError when they do
        not fit together (a preferred size above the largest batch, a queue smaller than one request)."""
        base = Batching.defaults(settings)
        largest = self.max_batch_size or base.max_batch_size
        preferred = self.preferred_batch_sizes
        if preferred is None:
            preferred = tuple(powers_of_two_below(largest))
        if any(p > largest for p in preferred):
            raise ConfigError(f"preferred_batch_size {list(preferred)} holds sizes above max_batch_size {largest}")
        queue = self.max_queue_size or base.max_queue_size
        if queue < settings.max_images_per_request:
            raise ConfigError(
                f"max_queue_size {queue} is below RESNEST_MAX_IMAGES_PER_REQUEST ({settings.max_images_per_request}):"
                " such a request could never be admitted"
            )
        delay = base.max_queue_delay_ms if self.max_queue_delay_ms is None else self.max_queue_delay_ms
        return Batching(largest, tuple(sorted(set(preferred))), delay, queue, base.pad)
