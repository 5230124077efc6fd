"""The model repository on disk, in Triton's layout: `<repo>/<model>/<version>/model.onnx`, with an optional
`<repo>/<model>/config.pbtxt` (config.py reads it).

Only the layout lives here (which files should be served, under which configuration); loading them into
sessions and batchers is the registry's job.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from ..identifiers import NAME_RULE, VERSION, is_model_name
from .config import ConfigError, ModelConfig

MODEL_FILE = "model.onnx"
CONFIG_FILE = "config.pbtxt"


class RepositoryError(ValueError):
    """The repository or one model's folder cannot be served as laid out; the message says why."""


@dataclass(frozen=True)
class ModelEntry:
    """One model folder: its versions on disk and the ones its policy selects."""

    name: str
    files: dict[int, Path]
    config: ModelConfig = field(default_factory=ModelConfig)

    @property
    def selected(self) -> list[int]:
        return self.config.version_policy.select(list(self.files))


def read_model(folder: Path) -> ModelEntry:
    """One `<repo>/<model>` folder -> its entry, or RepositoryError."""
    name = folder.name
    if not is_model_name(name):
        raise RepositoryError(f"model folder {name!r}: names are {NAME_RULE}")
    config_file = folder / CONFIG_FILE
    try:
        config = ModelConfig.parse(config_file.read_text()) if config_file.is_file() else ModelConfig()
    except ConfigError as exc:
        raise RepositoryError(f"model {name!r}: {CONFIG_FILE}: {exc}") from None
    files = {
        int(v.name): v / MODEL_FILE
        for v in folder.iterdir()
        if v.is_dir() and VERSION.fullmatch(v.name) and (v / MODEL_FILE).is_file()
    }
    if not files:
        raise RepositoryError(f"model {name!r} has no version folder <N>/{MODEL_FILE}")
    entry = ModelEntry(name, files, config)
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
