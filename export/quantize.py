"""Static int8 quantization of the exported graph (QDQ), and the accuracy report that gates it.

The fused fp32 graph (both outputs) is quantized by ONNX Runtime's own tool, `quantize_static`, in the QDQ
format that its CPU EP runs as QLinearConv & co.: weights int8 per output channel, activations uint8 with
ranges calibrated on images through the service's own preprocessing. The int8 graph is then compared with
the fp32 graph on held-out images calibration did not see (--eval's, scored against their labels; else a part
of the calibration folder held out of it; else bundled photographs); below the thresholds the export fails
and writes no model.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import logging
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
from onnxruntime.quantization import (
    CalibrationDataReader,
    CalibrationMethod,
    QuantFormat,
    QuantType,
    quantize_static,
)
from PIL import Image

from imaging import ImageError, preprocess
from modelcard import INPUT, PreprocessConfig

from .photos import heldout_photos, sample_photos

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")
# Pixel limit for calibration and evaluation files: a local file the user chose, not an untrusted upload.
MAX_PIXELS = 1 << 28
CALIBRATION_METHODS = {
    "minmax": CalibrationMethod.MinMax,
    "entropy": CalibrationMethod.Entropy,
    "percentile": CalibrationMethod.Percentile,
}
# Parts of the network that can be left in float, found by the weights their nodes read (export/fuse.py names
# them): the three stem convolutions, the split-attention gates (fc1/fc2 on the pooled map, their sigmoid or
# radix softmax and the Mul that applies them), and the classifier.
FLOAT_GROUPS = ("stem", "gates", "classifier")
# Images per calibration run. MinMax adds a ReduceMin and a ReduceMax per tensor, so a run keeps two scalars
# a tensor, whatever the batch. (CalibMaxIntermediateOutputs is left unset: in ORT 1.31.1 MinMax clears what
# it collected when that many runs are held, without merging it first, so most ranges would be lost.)
CALIBRATION_BATCH = 8


class QuantizeInputError(ValueError):
    """Calibration or evaluation images that cannot be used (missing, undecodable, unlabelled, overlapping)."""


@dataclass(frozen=True)
class Recipe:
    """How the graph is quantized: the calibration, the weights' quantization and what stays in float."""

    calibration: str = "minmax"
    per_channel: bool = True
    # 7-bit weights ([-64, 64]). On x86 without VNNI (AVX2, AVX-512 before Cascade Lake, AMD before Zen 4),
    # ORT's u8s8 kernels multiply with VPMADDUBSW, which adds two u8 x s8 products into a saturating int16:
    # 2 x 255 x 127 = 64770 overflows it, 2 x 255 x 64 = 32640 cannot. VNNI (VPDPBUSD) accumulates in int32,
    # so there both give the same answers. The model is quantized once and served on whatever CPU runs it,
    # and the accuracy report can only measure the kernels of the machine that exports: reduced range makes
    # its figures hold on every x86 CPU (see README, "int8").
    reduce_range: bool = True
    # The classifier stays in float: quantized, its output (and the embedding it reads, a graph output too)
    # is rounded to 256 levels within the calibration images' range, and logits beyond it are clipped: on the
    # digits model the largest logit error went from 0.036 to 0.43 of the logits' scale. It is one Gemm of
    # 2048 x classes, under 0.1% of resnest50's multiply-adds, so float costs nothing measurable.
    keep_float: tuple[str, ...] = ("classifier",)
    percentile: float = 99.999

    def __post_init__(self) -> None:
        if self.calibration not in CALIBRATION_METHODS:
            raise ValueError(f"calibration {self.calibration!r} is not one of {tuple(CALIBRATION_METHODS)}")
        if unknown := set(self.keep_float) - set(FLOAT_GROUPS):
            raise ValueError(f"unknown float groups {sorted(unknown)}; known: {FLOAT_GROUPS}")

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready fields, with the types ORT is asked for."""
        out = asdict(self)
        out["keep_float"] = list(self.keep_float)
        if self.calibration != "percentile":
            del out["percentile"]
        return {"format": "QDQ", "activations": "uint8 (asymmetric, per tensor)",
                "weights": "int8 (symmetric, " + ("per channel" if self.per_channel else "per tensor") + ")",
                **out}  # fmt: skip


# The default: everything but the classifier in int8 (the stem and the split-attention gates included), 7-bit
# weights per channel, MinMax ranges: chosen on the digits resnest14d (bench/train_digits.py, on VNNI and on
# an emulated AVX2 CPU) and resnest50 at 224 (bench/results/model-int8-cpu.md).
DEFAULT_RECIPE = Recipe()


# --- images ---------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ImageSet:
    """Encoded images with their names (and class indices where known), in a fixed order."""

    names: tuple[str, ...]
    blobs: tuple[bytes, ...]
    source: str
    labels: tuple[int, ...] | None = None
    _inputs: dict[PreprocessConfig, np.ndarray] = field(default_factory=dict, compare=False, repr=False)

    def __len__(self) -> int:
        return len(self.blobs)

    @property
    def digests(self) -> tuple[str, ...]:
        return tuple(hashlib.sha256(blob).hexdigest() for blob in self.blobs)

    def digest(self) -> str:
        """One SHA-256 over the images' own digests, in order: the set's identity, whatever the files' names."""
        return hashlib.sha256("".join(self.digests).encode()).hexdigest()

    def inputs(self, cfg: PreprocessConfig) -> np.ndarray:
        """(N, 3, S, S) float32 through the service's own decoding and preprocessing (decoded once per config)."""
        if (cached := self._inputs.get(cfg)) is not None:
            return cached
        out = []
        for name, blob in zip(self.names, self.blobs, strict=True):
            try:
                out.append(preprocess(blob, cfg, MAX_PIXELS))
            except ImageError as exc:
                raise QuantizeInputError(f"{self.source}: {name}: {exc}") from None
        self._inputs[cfg] = np.stack(out)
        return self._inputs[cfg]


def image_files(directory: Path) -> list[Path]:
    """JPEG and PNG files under `directory` (subfolders included), sorted by relative path."""
    if not directory.is_dir():
        raise QuantizeInputError(f"{directory}: not a directory")
    found = sorted(
        (p for p in directory.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES),
        key=lambda p: p.relative_to(directory).as_posix(),
    )
    if not found:
        raise QuantizeInputError(f"{directory}: no JPEG or PNG files ({', '.join(IMAGE_SUFFIXES)})")
    return found


def spread(items: Sequence[Any], limit: int) -> list[Any]:
    """At most `limit` items evenly spaced over the sequence: a class-sorted folder keeps every class."""
    if len(items) <= limit:
        return list(items)
    return [items[i] for i in np.linspace(0, len(items) - 1, limit).round().astype(int)]


def _folder_set(directory: Path, files: Sequence[Path], source: str) -> ImageSet:
    """Files of `directory`, named by their paths relative to it."""
    return ImageSet(tuple(p.relative_to(directory).as_posix() for p in files),
                    tuple(p.read_bytes() for p in files), source)  # fmt: skip


def _check_limit(limit: int) -> None:
    if limit < 1:
        raise QuantizeInputError(f"the calibration needs at least one image, got a limit of {limit}")


def calibration_set(directory: Path | None, limit: int) -> ImageSet:
    """The calibration images: up to `limit` files from `directory`, or the bundled photographs."""
    _check_limit(limit)
    if directory is None:
        photos = sample_photos()[:limit]
        return ImageSet(tuple(n for n, _ in photos), tuple(b for _, b in photos), "bundled photographs")
    return _folder_set(directory, spread(image_files(directory), limit), str(directory))


# Without --eval the int8 model is judged on the user's own domain, a part of the calibration folder that
# calibration never sees: natural photographs say nothing of a model fine-tuned on other images. The digits
# model calibrated on 200 of its scans was refused on them (cosine mean 0.979, confident top-1 agreement 0.84);
# calibrated on 160 and judged on the other 40, it agrees with fp32 on every one (cosine mean 0.9997, min
# 0.999). 1 file in HELDOUT_EVERY is held out, evenly spread over the sorted files, so a class-sorted folder
# keeps every class in both parts.
HELDOUT_EVERY = 5
# At least 8 held out, and 8 left to calibrate (as many as the bundled photographs, which calibrate the digits
# model as well as 256 scans do): a folder of fewer than 16 files is refused.
MIN_HELDOUT = MIN_CALIBRATION = 8
# Both graphs run on every held-out image, all preprocessed in memory at once (600 KB each for resnest50 at
# 224): a fifth of a 50,000-image folder would take GBs and minutes, 256 as many as the default calibration.
MAX_HELDOUT = 256


def heldout_positions(count: int) -> list[int]:
    """Indices of the files held out of `count` sorted ones: 1 in HELDOUT_EVERY within the bounds, evenly spread."""
    held = min(max(count // HELDOUT_EVERY, MIN_HELDOUT), MAX_HELDOUT)
    return [(2 * i + 1) * count // (2 * held) for i in range(held)]  # the middle of each of `held` equal runs


def split_calibration(directory: Path, limit: int) -> tuple[ImageSet, ImageSet]:
    """(calibration: up to `limit` of the files not held out, held out: the others) of an unlabelled folder.

    A held-out file with the bytes of a calibration image is left out of the held-out part rather than refused
    (a folder may hold copies; calibration saw those bytes); QuantizeInputError when the folder is too small to
    split, or when fewer than MIN_HELDOUT held-out files remain.
    """
    _check_limit(limit)
    files = image_files(directory)
    if len(files) < MIN_HELDOUT + MIN_CALIBRATION:
        raise QuantizeInputError(
            f"{directory}: {len(files)} image file(s) are too few to hold {MIN_HELDOUT} out for the accuracy check "
            f"and calibrate on {MIN_CALIBRATION} others: add images, or pass --eval with labelled held-out images"
        )
    positions = set(heldout_positions(len(files)))
    rest = [p for i, p in enumerate(files) if i not in positions]
    calibration = _folder_set(directory, spread(rest, limit), f"{directory} (its {len(rest)} files not held out)")
    held = _folder_set(directory, [p for i, p in enumerate(files) if i in positions], "")
    seen = set(calibration.digests)
    unseen = [i for i, digest in enumerate(held.digests) if digest not in seen]
    source = (f"{directory} (held out: {len(held)} of its {len(files)} files, 1 in {len(files) / len(held):.3g}, "
              "evenly spread; not used for calibration")  # fmt: skip
    if dropped := len(held) - len(unseen):
        source += f"; {dropped} with the bytes of a calibration image left out"
    if len(unseen) < MIN_HELDOUT:
        raise QuantizeInputError(
            f"{directory}: only {len(unseen)} held-out file(s) differ from every calibration image ({dropped} copy "
            "one): add distinct images, or pass --eval with labelled held-out images"
        )
    names, blobs = tuple(held.names[i] for i in unseen), tuple(held.blobs[i] for i in unseen)
    return calibration, ImageSet(names, blobs, source + ")")


def labelled_set(directory: Path, labels: Sequence[str]) -> ImageSet:
    """Images in one folder per class, each folder named by its class's label (as torchvision's ImageFolder)."""
    if not labels:
        raise QuantizeInputError("--eval: the model is headless (no classifier), so it has no classes to score")
    if not directory.is_dir():
        raise QuantizeInputError(f"{directory}: not a directory")
    index = {label: i for i, label in enumerate(labels)}  # a label that occurs twice scores as its first class
    folders = sorted(p for p in directory.iterdir() if p.is_dir())
    if unknown := [p.name for p in folders if p.name not in index]:
        raise QuantizeInputError(
            f"{directory}: folders {unknown[:5]} name no class of the model (its labels: {list(labels)[:10]}...)"
        )
    names, blobs, classes = [], [], []
    for folder in folders:
        for path in sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES):
            names.append(f"{folder.name}/{path.name}")
            blobs.append(path.read_bytes())
            classes.append(index[folder.name])
    if not blobs:
        raise QuantizeInputError(f"{directory}: no JPEG or PNG files in class folders (one folder per label)")
    return ImageSet(tuple(names), tuple(blobs), str(directory), tuple(classes))


def _views(blob: bytes) -> Iterator[bytes]:
    """The photograph, its mirror image and its four corners (60% of each side), each as a PNG file."""
    img = Image.open(io.BytesIO(blob))
    img = img.convert("RGB" if img.mode not in ("L", "RGB") else img.mode)
    w, h = img.size
    cw, ch = round(w * 0.6), round(h * 0.6)
    boxes = [(0, 0, cw, ch), (w - cw, 0, w, ch), (0, h - ch, cw, h), (w - cw, h - ch, w, h)]
    for view in [img, img.transpose(Image.Transpose.FLIP_LEFT_RIGHT), *(img.crop(b) for b in boxes)]:
        buf = io.BytesIO()
        view.save(buf, "PNG")
        yield buf.getvalue()


def heldout_set() -> ImageSet:
    """The photographs not among the bundled calibration ones, six views of each (60 images)."""
    names, blobs = [], []
    for name, blob in heldout_photos():
        for i, view in enumerate(_views(blob)):
            names.append(f"{name}#{i}")
            blobs.append(view)
    return ImageSet(tuple(names), tuple(blobs), "held-out photographs")


def check_unseen(heldout: ImageSet, calibration: ImageSet) -> None:
    """QuantizeInputError when a held-out image is also a calibration image (same bytes)."""
    seen = set(calibration.digests)
    if twice := [n for n, d in zip(heldout.names, heldout.digests, strict=True) if d in seen]:
        raise QuantizeInputError(
            f"{len(twice)} image(s) of {heldout.source} are also calibration images ({', '.join(twice[:5])}): "
            "the accuracy report needs images calibration did not see"
        )


# --- quantization ---------------------------------------------------------------------------------------------


def node_groups(model: onnx.ModelProto) -> dict[str, list[str]]:
    """Node names of each FLOAT_GROUPS part, found by the initializers the nodes read."""
    weights = {init.name for init in model.graph.initializer}
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for node in model.graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    groups: dict[str, list[str]] = {name: [] for name in FLOAT_GROUPS}
    for node in model.graph.node:
        reads = [name for name in node.input if name in weights]
        if node.op_type == "Conv" and reads and reads[0].startswith("stem."):
            groups["stem"].append(node.name)
        elif node.op_type == "Gemm" and reads and reads[0].startswith("fc."):
            groups["classifier"].append(node.name)
        elif node.op_type == "Conv" and reads and ".conv2.fc1." in reads[0]:
            groups["gates"].append(node.name)
        elif node.op_type == "Conv" and reads and ".conv2.fc2." in reads[0]:
            groups["gates"].append(node.name)
            # From fc2's logits to the Mul that weighs the feature map: Sigmoid, or Reshape-Softmax-Reshape.
            frontier = list(node.output)
            while frontier:
                for nxt in consumers.get(frontier.pop(), []):
                    groups["gates"].append(nxt.name)
                    if nxt.op_type != "Mul":
                        frontier.extend(nxt.output)
    return groups


class _Batches(CalibrationDataReader):
    """Calibration inputs for ORT, a fixed-size batch at a time."""

    def __init__(self, inputs: np.ndarray, batch: int = CALIBRATION_BATCH) -> None:
        self._chunks = iter([np.ascontiguousarray(inputs[i : i + batch]) for i in range(0, len(inputs), batch)])

    def get_next(self) -> dict[str, np.ndarray] | None:
        chunk = next(self._chunks, None)
        return None if chunk is None else {INPUT: chunk}


@contextlib.contextmanager
def _quiet_quantizer() -> Iterator[None]:
    """Drop the quantizer's advice to run its pre-processing: the exported graph is already optimised and
    shape-inferred (only the batch axis is symbolic), and pre-processing would rename what it quantizes."""

    def keep(record: logging.LogRecord) -> bool:
        return "pre-processing before quantization" not in record.getMessage()

    root = logging.getLogger()
    root.addFilter(keep)
    try:
        yield
    finally:
        root.removeFilter(keep)


def quantize(model: onnx.ModelProto, calibration: np.ndarray, recipe: Recipe = DEFAULT_RECIPE) -> onnx.ModelProto:
    """The QDQ int8 graph of an fp32 graph, its activation ranges calibrated on `calibration` (N, 3, S, S)."""
    groups = node_groups(model)
    excluded = [name for group in recipe.keep_float for name in groups[group]]
    extra: dict[str, Any] = {}
    if recipe.calibration == "percentile":
        extra["CalibPercentile"] = recipe.percentile
    with tempfile.TemporaryDirectory(prefix="resnest-int8-") as tmp, _quiet_quantizer():
        source, target = Path(tmp) / "fp32.onnx", Path(tmp) / "int8.onnx"
        onnx.save_model(model, str(source))
        quantize_static(
            str(source),
            str(target),
            _Batches(calibration),
            quant_format=QuantFormat.QDQ,
            per_channel=recipe.per_channel,
            reduce_range=recipe.reduce_range,
            activation_type=QuantType.QUInt8,
            weight_type=QuantType.QInt8,
            nodes_to_exclude=excluded,
            calibrate_method=CALIBRATION_METHODS[recipe.calibration],
            extra_options=extra,
        )
        out = onnx.load(str(target))
    del out.metadata_props[:]  # the card is written afresh by the pipeline
    return out


def float_nodes(model: onnx.ModelProto) -> dict[str, str]:
    """{name: op type} of the nodes of a QDQ graph that compute in float.

    A node is quantized when every input that is not a constant comes from a DequantizeLinear and every output
    goes only to QuantizeLinear nodes: ORT's CPU EP then runs it on int8 data (QLinearConv, QLinearAdd, ...)
    where it has such a kernel. The others compute in float on dequantized inputs: what the recipe kept in
    float, and what produces the graph's outputs.
    """
    nodes = model.graph.node
    constants = {init.name for init in model.graph.initializer}
    dequantized = {o for n in nodes if n.op_type == "DequantizeLinear" for o in n.output}
    consumers: dict[str, list[str]] = {}
    for node in nodes:
        for name in node.input:
            consumers.setdefault(name, []).append(node.op_type)
    outputs = {o.name for o in model.graph.output}
    plumbing = ("QuantizeLinear", "DequantizeLinear", "Constant")
    out = {}
    for node in nodes:
        if node.op_type in plumbing:
            continue
        ins = [name for name in node.input if name and name not in constants]
        quantized_in = bool(ins) and all(name in dequantized for name in ins)
        quantized_out = all(
            name not in outputs and consumers.get(name) and set(consumers[name]) == {"QuantizeLinear"}
            for name in node.output
        )
        if not (quantized_in and quantized_out):
            out[node.name] = node.op_type
    return out


# --- the accuracy report --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Thresholds:
    """What an int8 model must keep of its fp32 graph for the export to write it."""

    # Labelled images: held-out accuracy may fall by at most this much (absolute: 0.01 is 1 point). Intel Neural
    # Compressor's default criterion is 1% relative; absolute is the stricter of the two below 100% accuracy.
    max_accuracy_drop: float | None
    # Embeddings are compared by cosine (/embed serves them for retrieval): on average and for every image.
    min_cosine_mean: float
    min_cosine: float
    # Top-1 agreement with fp32 on the images where fp32 is confident: its top-1 logit beats the second by
    # more than `confident_margin` x the logits' scale (max |logit|). Below that margin a flip is a near tie
    # that any rounding may turn; above it, int8 must give the same answer.
    confident_margin: float
    min_confident_top1: float | None


# Trained weights: the labelled accuracy, where given, is the criterion that decides. The cosine floors (mean
# 0.98: 11 degrees; min 0.90: 26 degrees) sit far both from what the default recipe gives a trained model and
# from what a broken calibration (one blank image) gives it, so they pass any sound quantization and refuse a
# broken one: tests/test_quantize_digits.py measures both on the digits model and prints the figures.
TRAINED = Thresholds(
    max_accuracy_drop=0.01, min_cosine_mean=0.98, min_cosine=0.90, confident_margin=0.05, min_confident_top1=0.98
)
# Seeded random weights (plumbing and load tests) have no margin to keep and no accuracy to lose: their logits
# are near ties and quantization noise is not averaged out by trained redundancy. The floors sit between what
# the default recipe gives resnest50's random weights and what a one-grey-image calibration gives them
# (tests/test_quantize.py prints the tiny model's); top-1 is reported, not required.
RANDOM = Thresholds(
    max_accuracy_drop=0.01, min_cosine_mean=0.95, min_cosine=0.80, confident_margin=0.05, min_confident_top1=None
)


def _cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a, b = a.astype(np.float64), b.astype(np.float64)
    return np.sum(a * b, 1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1) + 1e-30)


def _topk(x: np.ndarray, k: int) -> np.ndarray:
    return np.argsort(-x, axis=1, kind="stable")[:, :k]


def compare(
    ref: tuple[np.ndarray | None, np.ndarray], got: tuple[np.ndarray | None, np.ndarray], confident_margin: float
) -> dict[str, Any]:
    """Figures of int8 (`got`) against fp32 (`ref`) over a set: (logits or None, embedding) each."""
    (ref_logits, ref_emb), (logits, emb) = ref, got
    cos = _cosine(ref_emb, emb)
    figures: dict[str, Any] = {
        "images": len(ref_emb),
        "embedding_cosine_min": float(cos.min()),
        "embedding_cosine_mean": float(cos.mean()),
        "embedding_rel_error_max": float(np.abs(emb - ref_emb).max() / max(float(np.abs(ref_emb).max()), 1e-12)),
    }
    if ref_logits is None or logits is None:
        return figures
    scale = max(float(np.abs(ref_logits).max()), 1e-12)
    err = np.abs(logits.astype(np.float64) - ref_logits)
    top2 = np.sort(ref_logits, axis=1)[:, -2:] if ref_logits.shape[1] > 1 else np.zeros((len(ref_logits), 2))
    confident = (top2[:, 1] - top2[:, 0]) > confident_margin * scale
    same = ref_logits.argmax(1) == logits.argmax(1)
    k = min(5, ref_logits.shape[1])
    overlap = [len(set(a) & set(b)) / k for a, b in zip(_topk(ref_logits, k), _topk(logits, k), strict=True)]
    return {
        "logit_scale": scale,
        "logit_rel_error_max": float(err.max()) / scale,
        "logit_rel_error_mean": float(err.mean()) / scale,
        **figures,
        "top1_agreement": float(same.mean()),
        "top5_overlap": float(np.mean(overlap)),
        "confident_images": int(confident.sum()),
        "confident_top1_agreement": float(same[confident].mean()) if confident.any() else None,
    }


def _run(model: bytes, inputs: np.ndarray, n: int = 16) -> tuple[np.ndarray | None, np.ndarray]:
    """(logits or None, embedding) of a graph on the CPU EP, in batches."""
    session = ort.InferenceSession(model, providers=["CPUExecutionProvider"])
    outs = [session.run(None, {INPUT: np.ascontiguousarray(inputs[i : i + n])}) for i in range(0, len(inputs), n)]
    if len(outs[0]) == 1:
        return None, np.concatenate([o[0] for o in outs])
    return np.concatenate([o[0] for o in outs]), np.concatenate([o[1] for o in outs])


def evaluate(
    fp32: bytes,
    int8: bytes,
    heldout: ImageSet,
    cfg: PreprocessConfig,
    trained: bool = True,
    thresholds: Thresholds | None = None,
) -> dict[str, Any]:
    """The accuracy report of `int8` against `fp32` on `heldout` (and its labels, where it has them).

    `thresholds` default to TRAINED, or RANDOM for seeded random weights (`trained` False).
    """
    thresholds = thresholds or (TRAINED if trained else RANDOM)
    inputs = heldout.inputs(cfg)
    ref, got = _run(fp32, inputs), _run(int8, inputs)
    report: dict[str, Any] = {
        "heldout": {"source": heldout.source, "images": len(heldout), "sha256": heldout.digest(),
                    "labelled": heldout.labels is not None, "files": list(heldout.names)},
        "providers": ["CPUExecutionProvider"],
        "agreement": compare(ref, got, thresholds.confident_margin),
    }  # fmt: skip
    if heldout.labels is not None and ref[0] is not None and got[0] is not None:
        truth = np.asarray(heldout.labels)
        fp32_acc, int8_acc = float(np.mean(ref[0].argmax(1) == truth)), float(np.mean(got[0].argmax(1) == truth))
        report["accuracy"] = {"fp32": fp32_acc, "int8": int8_acc, "drop": fp32_acc - int8_acc}
    report["thresholds"] = {"weights": "trained" if trained else "random", **asdict(thresholds)}
    report["failures"] = failures(report, thresholds)
    report["passed"] = not report["failures"]
    return report


def heldout_line(heldout: dict[str, Any], report_path: Path, shown: int = 8) -> str:
    """A report's held-out images in one log line: source, count, digest and the first file names."""
    files = heldout["files"]
    more = f", ... (all {len(files)} in {report_path})" if len(files) > shown else ""
    return (f"int8 judged on {heldout['images']} held-out images from {heldout['source']}, sha256 "
            f"{heldout['sha256']}: {', '.join(files[:shown])}{more}")  # fmt: skip


def failures(report: dict[str, Any], limits: Thresholds) -> list[str]:
    """The criteria a report misses; empty when the int8 model may be written."""
    fig = report["agreement"]
    out = []
    if fig["embedding_cosine_mean"] < limits.min_cosine_mean:
        out.append(f"embedding cosine mean {fig['embedding_cosine_mean']:.4f} < {limits.min_cosine_mean}")
    if fig["embedding_cosine_min"] < limits.min_cosine:
        out.append(f"embedding cosine min {fig['embedding_cosine_min']:.4f} < {limits.min_cosine}")
    confident = fig.get("confident_top1_agreement")
    if limits.min_confident_top1 is not None and confident is not None and confident < limits.min_confident_top1:
        out.append(
            f"top-1 agreement on the {fig['confident_images']} images where fp32 is confident {confident:.4f} "
            f"< {limits.min_confident_top1}"
        )
    acc = report.get("accuracy")
    if acc and limits.max_accuracy_drop is not None and acc["drop"] > limits.max_accuracy_drop + 1e-9:
        out.append(
            f"held-out accuracy fell from {acc['fp32']:.4f} (fp32) to {acc['int8']:.4f} (int8): "
            f"{100 * acc['drop']:.2f} points > {100 * limits.max_accuracy_drop:g}"
        )
    return out
