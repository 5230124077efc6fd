"""`python -m export` / `resnest-export`: build a ResNeSt, export it to ONNX and verify it."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import models
from modelcard import (
    FLOAT32_NCHW,
    INPUT_FORMATS,
    INTERPOLATIONS,
    PRECISIONS,
    RANDOM_WEIGHTS_WARNING,
    LabelsError,
    PreprocessConfig,
    duplicate_labels,
    read_labels,
)

from . import quantize as int8
from .labels import IMAGENET_CLASSES, resolve_labels
from .pipeline import SINGLE_LOGIT, ExportError, export_model

BANNER = "!" * 78


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m export",
        description="Export a ResNeSt to ONNX (outputs: logits, embedding; embedding only for a headless model) "
        "and verify it against PyTorch.",
    )
    parser.add_argument("--variant", default="resnest50", choices=models.list_models())
    parser.add_argument("--checkpoint", help="weights: a .pth/.safetensors path or an http(s) URL")
    parser.add_argument("--sha256", help="expected SHA-256 of the checkpoint (64 hex digits)")
    parser.add_argument("--output", type=Path, help="output .onnx (default: artifacts/<variant>-<precision>.onnx)")
    parser.add_argument(
        "--precision",
        choices=PRECISIONS,
        default="fp32",
        help="fp32; fp16 (GPUs); int8 (CPUs: static quantization, calibrated and gated by an accuracy report)",
    )
    parser.add_argument("--opset", type=int, default=18)
    parser.add_argument("--seed", type=int, default=0, help="seed of the random weights used without --checkpoint")
    parser.add_argument("--skip-naive", action="store_true", help="do not trace the unfused graph for comparison")
    parser.add_argument(
        "--input-format",
        choices=INPUT_FORMATS,
        default=FLOAT32_NCHW,
        help="the graph's input: float32-nchw (normalised on the host), or uint8-nhwc (the decoded, resized and "
        "cropped RGB bytes; cast, normalised and transposed on the device, checked against the float graph)",
    )
    parser.add_argument(
        "--no-feature-map",
        dest="feature_map",
        action="store_false",
        help="leave out the last feature map output (and the classifier record) that class activation maps "
        "(POST /explain) read; the graph is then the one earlier exports wrote",
    )
    head = parser.add_argument_group("classes (fine-tuned and headless checkpoints)")
    head.add_argument(
        "--num-classes",
        type=int,
        metavar="N",
        help="classes of the classifier: default the checkpoint's (fc.weight rows), 1000 without a checkpoint; "
        "0 exports the backbone alone (embeddings only); any other value must match the checkpoint",
    )
    head.add_argument(
        "--labels",
        type=Path,
        metavar="FILE",
        help="class names in class-index order: one per line (UTF-8), or a JSON list; exactly one per class "
        "(default: ImageNet's for a 1000-class head, class_0 ... otherwise, with a warning)",
    )
    quant = parser.add_argument_group("int8 (--precision int8)")
    quant.add_argument(
        "--calibration",
        type=Path,
        metavar="DIR",
        help="JPEG/PNG images (subfolders included) to calibrate the activation ranges on, preprocessed as the "
        "service does; without --eval, 1 file in 5 (evenly spread, 8 to 256 files; DIR needs 16 at least) is held "
        "out of calibration and int8 is checked against fp32 on them; default: the bundled photographs",
    )
    quant.add_argument(
        "--calibration-limit",
        type=int,
        default=256,
        metavar="N",
        help="calibrate on at most N images of DIR (of those not held out), evenly spaced over its sorted files "
        "(default 256)",
    )
    quant.add_argument(
        "--calibration-method",
        choices=tuple(int8.CALIBRATION_METHODS),
        default=int8.DEFAULT_RECIPE.calibration,
        help="how activation ranges are set from the calibration images (default minmax)",
    )
    quant.add_argument(
        "--eval",
        type=Path,
        metavar="DIR",
        help="labelled held-out images, one folder per class named by its label: int8 must keep fp32's accuracy "
        "on them within 1 point; all of --calibration DIR then calibrates (default: agreement with fp32 on the "
        "held-out part of --calibration DIR, or on the bundled held-out photographs)",
    )
    pre = parser.add_argument_group("preprocessing (default: the variant's; record what the model was trained with)")
    pre.add_argument("--input-size", type=int, metavar="S", help="square crop the model sees (default keeps crop_pct)")
    size = pre.add_mutually_exclusive_group()
    size.add_argument("--resize-size", type=int, metavar="R", help="shorter side before the centre crop (>= S)")
    size.add_argument("--crop-pct", type=float, metavar="P", help="S / resize size, in (0, 1]; 1.0: no crop")
    pre.add_argument("--interpolation", choices=INTERPOLATIONS, help="resampling filter of the resize")
    pre.add_argument("--mean", type=float, nargs="+", metavar="M", help="per-channel mean, R G B (or one for all)")
    pre.add_argument("--std", type=float, nargs="+", metavar="SD", help="per-channel std, R G B (or one for all)")
    return parser.parse_args(argv)


def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _channels(name: str, values: list[float] | None) -> tuple[float, float, float] | None:
    if values is None:
        return None
    if len(values) == 1:
        return (values[0],) * 3
    if len(values) != 3:
        raise ValueError(f"--{name} takes 3 values (R G B) or 1 for all channels, got {len(values)}")
    return (values[0], values[1], values[2])


def preprocess_config(args: argparse.Namespace, base: PreprocessConfig) -> tuple[PreprocessConfig, dict[str, Any]]:
    """The variant's preprocessing with the command line's overrides, and the overrides as given."""
    overrides: dict[str, Any] = {
        "input_size": args.input_size,
        "resize_size": args.resize_size,
        "crop_pct": args.crop_pct,
        "interpolation": args.interpolation,
        "mean": _channels("mean", args.mean),
        "std": _channels("std", args.std),
    }
    given = {k: v for k, v in overrides.items() if v is not None}
    return base.with_overrides(**given), given


def _build(args: argparse.Namespace) -> tuple[models.ResNeSt, dict[str, Any]]:
    """The model and its weights record; raises OSError/ValueError on bad weights or class counts."""
    if args.checkpoint:
        model = models.create_model(args.variant, args.checkpoint, num_classes=args.num_classes, sha256=args.sha256)
        info = model.checkpoint
        if info.num_classes and not model.num_classes:
            _log(f"--num-classes 0: leaving out the checkpoint's {info.num_classes}-class classifier")
        return model, {"source": info.source, "sha256": info.sha256}
    _log(f"{BANNER}\nWARNING: no --checkpoint given: exporting SEEDED RANDOM WEIGHTS (seed {args.seed}).")
    _log(f"{RANDOM_WEIGHTS_WARNING}\n{BANNER}")
    model = models.create_model(args.variant, num_classes=args.num_classes, seed=args.seed)
    return model, {"source": "random", "sha256": "random", "seed": args.seed}


def _int8_images(
    args: argparse.Namespace, cfg: PreprocessConfig
) -> tuple[int8.ImageSet | None, int8.ImageSet | None, int8.Recipe]:
    """The calibration and held-out sets and the recipe the int8 flags ask for (QuantizeInputError if bad).

    The held-out set is None (--eval's waits for the labels, the default is the bundled photographs) unless a
    --calibration folder without --eval holds part of itself out.
    """
    if args.precision != "int8":
        given = [f for f, v in (("--calibration", args.calibration), ("--eval", args.eval)) if v is not None]
        if given:
            raise int8.QuantizeInputError(f"{', '.join(given)}: only for --precision int8")
        return None, None, int8.DEFAULT_RECIPE
    heldout = None
    if args.calibration is not None and args.eval is None:
        calibration, heldout = int8.split_calibration(args.calibration, args.calibration_limit)
        heldout.inputs(cfg)  # an undecodable file fails here, before minutes of tracing
    else:
        calibration = int8.calibration_set(args.calibration, args.calibration_limit)
    calibration.inputs(cfg)
    return calibration, heldout, int8.Recipe(calibration=args.calibration_method)


def main(argv: list[str] | None = None) -> int:
    """Run one export; exit status 1 when a graph, parity or int8 accuracy check fails, 2 on bad arguments."""
    args = parse_args(argv)
    variant = models.get_variant(args.variant)
    try:
        if args.num_classes is not None and args.num_classes < 0:
            raise ValueError(f"--num-classes must be 0 (headless) or positive, got {args.num_classes}")
        cfg, overrides = preprocess_config(args, variant.data)
        if args.labels is not None:
            read_labels(args.labels)  # a malformed file fails here, before minutes of tracing
        calibration, heldout, recipe = _int8_images(args, cfg)
    except (ValueError, LabelsError) as exc:
        _log(f"error: {exc}")
        return 2
    output: Path = args.output or Path("artifacts") / f"{args.variant}-{args.precision}.onnx"
    _log(f"building {args.variant} ({'checkpoint ' + args.checkpoint if args.checkpoint else 'random weights'})")
    try:
        model, weights = _build(args)
        if model.num_classes == 1:
            raise ValueError(SINGLE_LOGIT)
        labels, source, provenance = resolve_labels(model.num_classes, args.labels)
    except models.ClassCountMismatch as exc:
        _log(f"error: --num-classes {exc.asked} does not match the checkpoint: {exc.checkpoint_has()}")
        return 2
    except (OSError, ValueError) as exc:  # missing file, bad digest, mismatching keys, bad URL, bad labels
        _log(f"error: {exc}")
        return 2
    head = f"{model.num_classes} classes, labels: {source}" if model.num_classes else "headless: embeddings only"
    _log(f"{head}; preprocessing {cfg.to_dict()}" + (f" (overridden: {', '.join(overrides)})" if overrides else ""))
    if source == "generic":
        _log(f"{BANNER}\nWARNING: a {model.num_classes}-class head without --labels (only a {IMAGENET_CLASSES}-class "
             f"head is taken to be ImageNet's): its classes are answered as class_0 ... class_{model.num_classes - 1}."
             f"\n{BANNER}")  # fmt: skip
    if source == "file" and (twice := duplicate_labels(labels)):
        _log(f"WARNING: labels that occur more than once in {args.labels}: {', '.join(twice[:10])}")
    if overrides:
        provenance["preprocess_overrides"] = {k: list(v) if isinstance(v, tuple) else v for k, v in overrides.items()}
    if args.eval is not None:
        try:  # the folders name classes, so this waits for the labels
            heldout = int8.labelled_set(args.eval, labels)
            heldout.inputs(cfg)
            if calibration is not None:
                int8.check_unseen(heldout, calibration)
        except int8.QuantizeInputError as exc:
            _log(f"error: {exc}")
            return 2
    try:
        result = export_model(
            model,
            cfg,
            output,
            weights=weights,
            labels=labels,
            labels_source=source,
            provenance=provenance,
            precision=args.precision,
            opset=args.opset,
            seed=args.seed,
            compare_naive=not args.skip_naive,
            log=_log,
            calibration=calibration,
            heldout=heldout,
            recipe=recipe,
            input_format=args.input_format,
            feature_map=args.feature_map,
        )
    except ExportError as exc:
        _log(f"FAILED: {exc}")
        return 1
    for warning in result.card.warnings:
        _log(f"WARNING: {warning}")
    return 0
