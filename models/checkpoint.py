"""Loading official and timm checkpoints into the project's ResNeSt, with strict key and shape checking."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import torch
from torch import nn

from .download import check_digest, download, expected_digest, sha256_file
from .variants import VARIANTS

StateDict = dict[str, torch.Tensor]
_WRAPPERS = ("state_dict", "model", "model_state_dict", "net")
_SAFETENSORS_DTYPES = {
    "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "F64": torch.float64,
    "I64": torch.int64, "I32": torch.int32, "U8": torch.uint8,
}  # fmt: skip


class CheckpointMismatch(ValueError):
    """The checkpoint's keys or shapes do not fit the model it is loaded into."""


class ClassCountMismatch(CheckpointMismatch):
    """The class count asked for is not the one the checkpoint's classifier was trained with."""

    def __init__(self, asked: int, found: int, fc_shape: tuple[int, ...] | None) -> None:
        self.asked, self.found, self.fc_shape = asked, found, fc_shape
        super().__init__(f"num_classes={asked} was asked for, but {self.checkpoint_has()}")

    def checkpoint_has(self) -> str:
        """What the checkpoint holds, in words."""
        if not self.found:
            return "the checkpoint has no classifier (no fc.weight: a headless backbone, which only embeds)"
        return f"the checkpoint's classifier has {self.found} classes (fc.weight {list(self.fc_shape or ())})"


@dataclass(frozen=True)
class CheckpointInfo:
    """Where the weights came from and their verified digest."""

    source: str
    path: str
    sha256: str
    num_classes: int | None = None  # classes of the checkpoint's own classifier (0: none), where known


def _read_safetensors(path: Path) -> StateDict:
    # The format is an 8-byte little-endian header length, a JSON header, then raw little-endian tensors.
    with open(path, "rb") as f:
        header_len = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(header_len))
        data = f.read()
    state: StateDict = {}
    for key, meta in header.items():
        if key == "__metadata__":
            continue
        start, end = meta["data_offsets"]
        dtype = _SAFETENSORS_DTYPES[meta["dtype"]]
        tensor = (
            torch.frombuffer(bytearray(data[start:end]), dtype=dtype) if end > start else torch.empty(0, dtype=dtype)
        )
        state[key] = tensor.reshape(meta["shape"])
    return state


def read_state_dict(path: Path) -> StateDict:
    """Read a .pth/.bin (torch.load, weights only) or .safetensors file and unwrap it to a flat state_dict."""
    if path.suffix == ".safetensors":
        obj: object = _read_safetensors(path)
    else:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    while isinstance(obj, dict):
        wrapper = next((k for k in _WRAPPERS if isinstance(obj.get(k), dict)), None)
        if wrapper is None or any(isinstance(v, torch.Tensor) for v in obj.values()):
            break
        obj = obj[wrapper]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CheckpointMismatch(f"{path} does not hold a state_dict of tensors")
    return {k.removeprefix("module."): v for k, v in obj.items()}


def _backbone_shapes(state: dict[str, torch.Tensor]) -> dict[str, tuple[int, ...]]:
    # The classifier is left out: a fine-tuned or headless checkpoint has the same backbone as its variant.
    return {
        k: tuple(v.shape) for k, v in state.items() if not k.endswith("num_batches_tracked") and not k.startswith("fc.")
    }


@cache
def _variant_shapes(name: str) -> dict[str, tuple[int, ...]]:
    from .resnest import ResNeSt  # local: resnest imports nothing from here, this keeps it that way

    with torch.device("meta"):
        model = ResNeSt(VARIANTS[name], num_classes=0)
    return _backbone_shapes(model.state_dict())


def matching_variants(state: StateDict) -> list[str]:
    """Names of the variants whose backbone parameter names and shapes the state_dict fits exactly."""
    shapes = _backbone_shapes(state)
    return [name for name in VARIANTS if _variant_shapes(name) == shapes]


def classifier_width(state: StateDict) -> int:
    """Classes of the state_dict's classifier: fc.weight's rows, or 0 for a headless backbone."""
    weight = state.get("fc.weight")
    return int(weight.shape[0]) if weight is not None and weight.ndim == 2 else 0


def fit_classifier(state: StateDict, num_classes: int | None) -> tuple[StateDict, int]:
    """(state, classes) for a model of `num_classes` classes (None: the checkpoint's own).

    0 keeps only the backbone of a checkpoint that has a classifier (timm's num_classes=0); any other count
    must be the checkpoint's, else ClassCountMismatch: a head of another size would be untrained.
    """
    found = classifier_width(state)
    if num_classes is None or num_classes == found:
        return state, found
    if num_classes == 0:
        return {k: v for k, v in state.items() if not k.startswith("fc.")}, 0
    weight = state.get("fc.weight")
    raise ClassCountMismatch(num_classes, found, tuple(weight.shape) if weight is not None else None)


def _describe(keys: list[str], limit: int = 5) -> str:
    more = f" (+{len(keys) - limit} more)" if len(keys) > limit else ""
    return ", ".join(keys[:limit]) + more


def check_state_dict(model: nn.Module, state: StateDict) -> StateDict:
    """Strict key/shape check; returns the state with missing num_batches_tracked filled in.

    The error names the first mismatching keys and, where the shapes fit another variant, which one.
    """
    expected = model.state_dict()
    filled = dict(state)
    for key, value in expected.items():
        if key.endswith("num_batches_tracked") and key not in filled:
            filled[key] = torch.zeros_like(value, device="cpu")
    missing = [k for k in expected if k not in filled]
    unexpected = [k for k in filled if k not in expected]
    wrong = [
        f"{k} {tuple(filled[k].shape)} != {tuple(v.shape)}"
        for k, v in expected.items()
        if k in filled and filled[k].shape != v.shape
    ]
    if not (missing or unexpected or wrong):
        return filled
    problems = []
    if missing:
        problems.append(f"missing keys: {_describe(missing)}")
    if unexpected:
        problems.append(f"unexpected keys: {_describe(unexpected)}")
    if wrong:
        problems.append(f"shape mismatches: {_describe(wrong)}")
    name = getattr(getattr(model, "variant", None), "name", type(model).__name__)
    message = f"checkpoint does not fit {name}: " + "; ".join(problems)
    if fits := matching_variants(state):
        message += f". These weights fit: {', '.join(fits)}"
    raise CheckpointMismatch(message)


def fetch_checkpoint(
    source: str | os.PathLike[str],
    *,
    sha256: str | None = None,
    cache_dir: Path | None = None,
    progress: bool = True,
) -> tuple[Path, str]:
    """(local path, verified SHA-256) of a checkpoint given as a path or an http(s) URL (downloaded, cached)."""
    text = os.fspath(source)
    if text.startswith(("https://", "http://")):
        return download(text, sha256=sha256, cache_dir=cache_dir, progress=progress)
    path = Path(text)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    digest = sha256_file(path)
    check_digest(digest, expected_digest(path.name, sha256), str(path))
    return path, digest


def load_checkpoint(
    model: nn.Module,
    source: str | os.PathLike[str],
    *,
    sha256: str | None = None,
    cache_dir: Path | None = None,
    progress: bool = True,
) -> CheckpointInfo:
    """Load weights from a local file or an http(s) URL into `model` (strict), verifying the SHA-256."""
    path, digest = fetch_checkpoint(source, sha256=sha256, cache_dir=cache_dir, progress=progress)
    raw = read_state_dict(path)
    model.load_state_dict(check_state_dict(model, raw), strict=True)
    return CheckpointInfo(source=os.fspath(source), path=str(path), sha256=digest, num_classes=classifier_width(raw))
