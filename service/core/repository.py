"""The model repository on disk, in Triton's layout: `<repo>/<model>/<version>/model.onnx`.

Only the layout and the version policy live here (which files should be served); loading them into
sessions and batchers is the registry's job. A model folder may hold a `config.pbtxt`; of it, this service
reads `version_policy` (`latest { num_versions: N }`, `all {}`, `specific { versions: [..] }`) and refuses
any other policy syntax rather than guess.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

from .identifiers import NAME_RULE, VERSION, is_model_name

MODEL_FILE = "model.onnx"
CONFIG_FILE = "config.pbtxt"
_POLICY = re.compile(r"version_policy\s*:?\s*\{(?P<body>(?:[^{}]|\{[^{}]*\})*)\}", re.S)


class RepositoryError(ValueError):
    """The repository or one model's folder cannot be served as laid out; the message says why."""


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


def parse_version_policy(text: str) -> VersionPolicy:
    """The version_policy of a config.pbtxt (protobuf text format); latest 1 when it has none."""
    text = re.sub(r"#[^\n]*", "", text)
    found = _POLICY.search(text)
    if found is None:
        return VersionPolicy()
    body = found.group("body").strip()
    if re.fullmatch(r"all\s*:?\s*\{\s*\}", body):
        return VersionPolicy("all")
    latest = re.fullmatch(r"latest\s*:?\s*\{\s*num_versions\s*:\s*(\d+)\s*\}", body)
    if latest:
        n = int(latest.group(1))
        if n < 1:
            raise RepositoryError("version_policy latest needs num_versions >= 1")
        return VersionPolicy("latest", num_versions=n)
    specific = re.fullmatch(r"specific\s*:?\s*\{\s*versions\s*:\s*\[([\d,\s]*)\]\s*\}", body)
    if specific:
        versions = tuple(int(v) for v in specific.group(1).replace(",", " ").split())
        if not versions:
            raise RepositoryError("version_policy specific lists no versions")
        return VersionPolicy("specific", versions=versions)
    raise RepositoryError(
        f"unsupported version_policy {{{body}}}: use latest {{ num_versions: N }}, all {{}} or specific"
    )


@dataclass(frozen=True)
class ModelEntry:
    """One model folder: its versions on disk and the ones its policy selects."""

    name: str
    files: dict[int, Path]
    policy: VersionPolicy = field(default_factory=VersionPolicy)

    @property
    def selected(self) -> list[int]:
        return self.policy.select(list(self.files))


def read_model(folder: Path) -> ModelEntry:
    """One `<repo>/<model>` folder -> its entry, or RepositoryError."""
    name = folder.name
    if not is_model_name(name):
        raise RepositoryError(f"model folder {name!r}: names are {NAME_RULE}")
    config = folder / CONFIG_FILE
    policy = parse_version_policy(config.read_text()) if config.is_file() else VersionPolicy()
    files = {
        int(v.name): v / MODEL_FILE
        for v in folder.iterdir()
        if v.is_dir() and VERSION.fullmatch(v.name) and (v / MODEL_FILE).is_file()
    }
    if not files:
        raise RepositoryError(f"model {name!r} has no version folder <N>/{MODEL_FILE}")
    entry = ModelEntry(name, files, policy)
    if not entry.selected:
        raise RepositoryError(f"model {name!r}: its version_policy selects none of the versions {sorted(files)}")
    return entry


def model_folder(root: Path, name: str) -> Path | None:
    """The folder of model `name` inside the repository `root`, or None when there is none.

    `name` comes from a client: it must be one path segment of the name pattern (checked before the filesystem
    is touched), and the folder it resolves to, symbolic links followed, must lie inside the repository.
    """
    if not is_model_name(name):
        return None
    folder = root / name
    try:
        inside = folder.resolve(strict=True).is_relative_to(root.resolve(strict=True))
    except OSError:  # missing, a loop, unreadable: no such model either way
        return None
    return folder if inside and folder.is_dir() else None


def scan(root: Path) -> dict[str, ModelEntry | RepositoryError]:
    """Every model folder of the repository, by name: its entry, or why it cannot be served."""
    if not root.is_dir():
        raise RepositoryError(f"model repository {root} is not a directory")
    found: dict[str, ModelEntry | RepositoryError] = {}
    for folder in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
        try:
            found[folder.name] = read_model(folder)
        except (RepositoryError, OSError) as exc:
            found[folder.name] = exc if isinstance(exc, RepositoryError) else RepositoryError(str(exc))
    return found
