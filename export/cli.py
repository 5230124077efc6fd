"""`python -m export` / `resnest-export`: build a ResNeSt, export it to ONNX and verify it."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import models
from service.model_card import RANDOM_WEIGHTS_WARNING
from service.preprocess import PreprocessConfig

from .pipeline import ExportError, export_model


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m export",
        description="Export a ResNeSt to ONNX (outputs: logits, embedding) and verify it against PyTorch.",
    )
    parser.add_argument("--variant", default="resnest50", choices=models.list_models())
    parser.add_argument("--checkpoint", help="weights: a .pth/.safetensors path or an http(s) URL")
    parser.add_argument("--sha256", help="expected SHA-256 of the checkpoint (64 hex digits)")
    parser.add_argument("--output", type=Path, help="output .onnx (default: artifacts/<variant>-<precision>.onnx)")
    parser.add_argument("--precision", choices=("fp32", "fp16"), default="fp32")
    parser.add_argument("--opset", type=int, default=18)
    parser.add_argument("--input-size", type=int, help="serve at another square size (resize keeps crop_pct)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random weights used without --checkpoint")
    parser.add_argument("--skip-naive", action="store_true", help="do not trace the unfused graph for comparison")
    return parser.parse_args(argv)


def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def main(argv: list[str] | None = None) -> int:
    """Run one export; exit status 1 when a graph or parity check fails, 2 on bad arguments or weights."""
    args = parse_args(argv)
    variant = models.get_variant(args.variant)
    data = variant.data
    size = args.input_size or data.input_size
    resize = data.resize_size if size == data.input_size else int(size / data.crop_pct)  # floor, as timm
    cfg = PreprocessConfig(size, resize, data.interpolation, data.mean, data.std)
    output: Path = args.output or Path("artifacts") / f"{args.variant}-{args.precision}.onnx"
    _log(f"building {args.variant} ({'checkpoint ' + args.checkpoint if args.checkpoint else 'random weights'})")
    try:
        if args.checkpoint:
            model = models.create_model(args.variant, args.checkpoint, sha256=args.sha256)
            weights = {"source": model.checkpoint.source, "sha256": model.checkpoint.sha256}
        else:
            banner = "!" * 78
            _log(f"{banner}\nWARNING: no --checkpoint given: exporting SEEDED RANDOM WEIGHTS (seed {args.seed}).")
            _log(f"{RANDOM_WEIGHTS_WARNING}\n{banner}")
            model = models.create_model(args.variant, seed=args.seed)
            weights = {"source": "random", "sha256": "random", "seed": args.seed}
    except (OSError, ValueError) as exc:  # missing file, bad digest, mismatching keys, bad URL
        _log(f"error: {exc}")
        return 2
    try:
        result = export_model(
            model,
            cfg,
            output,
            weights=weights,
            precision=args.precision,
            opset=args.opset,
            seed=args.seed,
            compare_naive=not args.skip_naive,
            log=_log,
        )
    except ExportError as exc:
        _log(f"FAILED: {exc}")
        return 1
    if result.card.warning:
        _log(f"WARNING: {result.card.warning}")
    return 0
