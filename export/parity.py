"""Parity between PyTorch and ONNX Runtime on the exported file: random tensors and real photographs."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

BATCH_SIZES = (1, 3, 8)


@dataclass(frozen=True)
class Thresholds:
    """Pass criteria. Errors are relative to the reference's scale (max |value|), per output."""

    max_rel_logits: float
    max_rel_embedding: float  # also the feature map's (the embedding is its spatial mean)
    min_cosine: float
    # Share of images whose top-1 must agree; with `near_ties_ok`, a disagreement counts as agreement when
    # the two classes' reference logits differ by no more than twice the observed max abs error.
    min_top1: float
    near_ties_ok: bool


# fp32: the same math in another order; errors stay near float32 epsilon times depth.
FP32 = Thresholds(max_rel_logits=1e-4, max_rel_embedding=1e-4, min_cosine=0.99999, min_top1=1.0, near_ties_ok=False)
# fp16: weights and activations carry an 11-bit mantissa (unit roundoff 4.9e-4); through ~50 layers the
# error grows to about 1e-2 of the output scale, so top-1 may only flip between classes whose logits are
# closer than that error. Cosine >= 0.999 keeps embeddings interchangeable for retrieval.
FP16 = Thresholds(max_rel_logits=3e-2, max_rel_embedding=3e-2, min_cosine=0.999, min_top1=1.0, near_ties_ok=True)


def _topk(x: np.ndarray, k: int) -> np.ndarray:
    return np.argsort(-x, axis=1, kind="stable")[:, :k]


def compare(
    ref_logits: np.ndarray | None,
    ref_emb: np.ndarray,
    logits: np.ndarray | None,
    emb: np.ndarray,
    ref_features: np.ndarray | None = None,
    features: np.ndarray | None = None,
) -> dict[str, float]:
    """Error figures of one batch: abs/rel error of each output, top-1/top-5 agreement, cosine.

    Without logits (a headless model) only the embedding's figures are computed; the feature map's where both
    sides have one.
    """
    emb_err = np.abs(emb.astype(np.float64) - ref_emb)
    emb_scale = float(np.abs(ref_emb).max())
    cos = np.sum(ref_emb * emb, 1) / (np.linalg.norm(ref_emb, axis=1) * np.linalg.norm(emb, axis=1) + 1e-30)
    figures = {
        "embedding_scale": emb_scale,
        "max_abs_embedding": float(emb_err.max()),
        "max_rel_embedding": float(emb_err.max()) / max(emb_scale, 1e-12),
        "min_cosine_embedding": float(cos.min()),
    }
    if ref_features is not None and features is not None:
        feature_err = float(np.abs(features.astype(np.float64) - ref_features).max())
        feature_scale = float(np.abs(ref_features).max())
        figures.update(feature_scale=feature_scale, max_abs_features=feature_err,
                       max_rel_features=feature_err / max(feature_scale, 1e-12))  # fmt: skip
    if ref_logits is None or logits is None:
        return figures
    logit_err = np.abs(logits.astype(np.float64) - ref_logits)
    logit_scale = float(np.abs(ref_logits).max())
    ref_top1, top1 = ref_logits.argmax(1), logits.argmax(1)
    max_abs = float(logit_err.max())
    rows = np.arange(len(ref_logits))
    gap = ref_logits[rows, ref_top1] - ref_logits[rows, top1]
    k = min(5, ref_logits.shape[1])  # a fine-tuned head may have fewer than five classes
    topk = np.mean([len(set(a) & set(b)) / k for a, b in zip(_topk(ref_logits, k), _topk(logits, k), strict=True)])
    return {
        "logit_scale": logit_scale,
        "max_abs_logits": max_abs,
        "max_rel_logits": max_abs / max(logit_scale, 1e-12),
        **figures,
        "top1_agreement": float(np.mean(ref_top1 == top1)),
        "top1_agreement_or_near_tie": float(np.mean((ref_top1 == top1) | (gap <= 2 * max_abs))),
        "top5_agreement": float(topk),
    }


def failures(figures: dict[str, float], limits: Thresholds) -> list[str]:
    """The criteria one comparison misses; empty when it passes (logit criteria only where there are logits)."""
    checks = [
        ("max_rel_embedding", figures["max_rel_embedding"] <= limits.max_rel_embedding, limits.max_rel_embedding),
        ("min_cosine_embedding", figures["min_cosine_embedding"] >= limits.min_cosine, limits.min_cosine),
    ]
    if "max_rel_features" in figures:
        checks.append(
            ("max_rel_features", figures["max_rel_features"] <= limits.max_rel_embedding, limits.max_rel_embedding)
        )
    if "max_rel_logits" in figures:
        top1 = figures["top1_agreement_or_near_tie" if limits.near_ties_ok else "top1_agreement"]
        checks = [
            ("max_rel_logits", figures["max_rel_logits"] <= limits.max_rel_logits, limits.max_rel_logits),
            *checks,
            ("top1_agreement", top1 >= limits.min_top1, limits.min_top1),
        ]
    return [f"{name} {figures[name]:.3g} (limit {limit})" for name, ok, limit in checks if not ok]


def batches(photos: np.ndarray, seed: int, input_size: int) -> dict[str, dict[int, np.ndarray]]:
    """Inputs per kind and batch size: seeded N(0,1) tensors, and the photographs (cycled to fill)."""
    gen = np.random.default_rng(seed)
    out: dict[str, dict[int, np.ndarray]] = {"random": {}, "photos": {}}
    for n in BATCH_SIZES:
        out["random"][n] = gen.standard_normal((n, 3, input_size, input_size), dtype=np.float32)
        out["photos"][n] = np.ascontiguousarray(photos[np.arange(n) % len(photos)])
    return out


def _split(outputs: Sequence[np.ndarray]) -> tuple[np.ndarray | None, np.ndarray, np.ndarray | None]:
    """(logits, embedding, features) from a model's outputs: all three, the first two (no feature map), or the
    embedding alone (headless); what a graph lacks is None."""
    if len(outputs) == 3:
        return outputs[0], outputs[1], outputs[2]
    if len(outputs) == 2:
        return outputs[0], outputs[1], None
    if len(outputs) == 1:
        return None, outputs[0], None
    raise ValueError(f"expected (logits, embedding[, features]) or (embedding,), got {len(outputs)} outputs")


@torch.no_grad()
def check(
    reference: torch.nn.Module,
    run_onnx: dict[str, object],
    inputs: dict[str, dict[int, np.ndarray]],
    limits: Thresholds,
) -> dict[str, object]:
    """Compare `reference` with every ORT runner given, on every input batch.

    `reference` maps images to (logits, embedding[, features]), or (embedding,) for a headless model;
    `run_onnx` maps a provider name to a callable taking a batch and returning the same outputs as arrays.
    """
    results: list[dict[str, object]] = []
    for kind, by_size in inputs.items():
        for n, batch in by_size.items():
            ref_logits, ref_emb, ref_fmap = _split([t.double().numpy() for t in reference(torch.from_numpy(batch))])
            for provider, run in run_onnx.items():
                logits, emb, fmap = _split(run(batch))  # type: ignore[operator]
                figures = compare(ref_logits, ref_emb, logits, emb, ref_fmap, fmap)
                results.append({"provider": provider, "inputs": kind, "batch": n, **figures,
                                "failures": failures(figures, limits)})  # fmt: skip
    worst = _worst(results)
    return {
        "passed": all(not r["failures"] for r in results),
        "thresholds": limits.__dict__,
        "worst": worst,
        "cases": results,
    }


def _worst(results: Sequence[dict[str, object]]) -> dict[str, float]:
    keys_max = ("max_abs_logits", "max_rel_logits", "max_abs_embedding", "max_rel_embedding", "max_abs_features",
                "max_rel_features")  # fmt: skip
    keys_min = ("top1_agreement", "top5_agreement", "min_cosine_embedding")
    present = [k for k in (*keys_max, *keys_min) if all(k in r for r in results)]
    worst: dict[str, float] = {
        k: (max if k in keys_max else min)(float(r[k]) for r in results)  # type: ignore[arg-type]
        for k in present
    }
    return worst
