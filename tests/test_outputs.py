"""modelcard.outputs: softmax, top-k answers and L2-normalised embeddings, with numbers."""

from __future__ import annotations

import numpy as np
import pytest

from modelcard.outputs import l2_normalize, softmax, top_k

LABELS = [f"class {i}" for i in range(1000)]


def reference_softmax(logits: np.ndarray) -> np.ndarray:
    x = logits.astype(np.float64)
    e = np.exp(x - x.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def stable_top(logits: np.ndarray, k: int) -> list[list[int]]:
    """The specified order: best first, ties by lower index (a stable sort of the negated probabilities)."""
    probs = softmax(logits)
    return np.argsort(-probs, axis=1, kind="stable")[:, :k].tolist()


# --- softmax ------------------------------------------------------------------------------------------------------


def test_softmax_rows_sum_to_one() -> None:
    logits = (np.random.default_rng(0).standard_normal((32, 1000)) * 10).astype(np.float32)
    probs = softmax(logits)
    assert probs.shape == logits.shape and probs.dtype == np.float32
    deviation = float(np.abs(probs.astype(np.float64).sum(axis=1) - 1).max())
    error = float(np.abs(probs - reference_softmax(logits)).max())
    print(f"\nsoftmax: max |row sum - 1| {deviation:.2e}, max abs error vs float64 {error:.2e}")
    assert deviation <= 1e-6  # float32 rounding of 1000 probabilities adds at most ~6e-8 in total
    assert error <= 1e-7
    assert (probs >= 0).all()


def test_softmax_is_stable_at_large_scale() -> None:
    logits = np.array([[1e4, 0.0, -1e4], [-1e4, -1e4, -1e4 + 1]], dtype=np.float32)
    probs = softmax(logits)  # filterwarnings=error: an overflow in exp would fail here
    assert np.isfinite(probs).all()
    np.testing.assert_allclose(probs[0], [1.0, 0.0, 0.0], atol=0)
    e = np.exp(-1.0)
    np.testing.assert_allclose(probs[1], [e / (1 + 2 * e), e / (1 + 2 * e), 1 / (1 + 2 * e)], rtol=1e-6)

    wide = (np.random.default_rng(1).standard_normal((8, 1000)) * 1e4).astype(np.float32)
    probs = softmax(wide)
    assert np.isfinite(probs).all()
    assert np.abs(probs.astype(np.float64).sum(axis=1) - 1).max() <= 1e-6
    assert (probs.argmax(1) == wide.argmax(1)).all()


def test_softmax_is_shift_invariant() -> None:
    logits = np.random.default_rng(2).standard_normal((4, 1000))
    diff = float(np.abs(softmax(logits + 1e4) - softmax(logits)).max())
    assert diff <= 1e-7, diff


# --- top_k --------------------------------------------------------------------------------------------------------


def test_top_k_returns_best_first_with_probabilities() -> None:
    logits = (np.random.default_rng(3).standard_normal((4, 1000)) * 3).astype(np.float32)
    probs = softmax(logits)
    answers = top_k(logits, 5, LABELS)
    assert len(answers) == 4
    for row, answer, expected in zip(probs, answers, stable_top(logits, 5), strict=True):
        assert len(answer) == 5
        assert all(set(item) == {"index", "label", "score"} for item in answer)
        assert [item["index"] for item in answer] == expected
        assert all(type(item["index"]) is int and type(item["score"]) is float for item in answer)
        assert [item["label"] for item in answer] == [LABELS[i] for i in expected]
        assert [item["score"] for item in answer] == [float(row[i]) for i in expected]  # exact probabilities
        scores = [item["score"] for item in answer]
        assert scores == sorted(scores, reverse=True)
        assert 0 < sum(scores) <= 1 + 1e-6


def test_top_k_orders_ties_within_the_result_by_index() -> None:
    logits = np.array([[0.0, 2.0, 5.0, 2.0, 5.0, 2.0]], dtype=np.float32)
    answer = top_k(logits, 5, LABELS[:6])[0]
    assert [item["index"] for item in answer] == [2, 4, 1, 3, 5]
    assert answer[0]["score"] == answer[1]["score"]


def test_top_k_ties_at_the_cut_keep_the_lowest_indices() -> None:
    uniform = np.zeros((1, 1000), dtype=np.float32)
    assert [item["index"] for item in top_k(uniform, 1, LABELS)[0]] == [0]
    straddling = np.zeros((1, 1000), dtype=np.float32)
    straddling[0, [3, 500, 999]] = 1.0
    assert [item["index"] for item in top_k(straddling, 2, LABELS)[0]] == [3, 500]
    rng = np.random.default_rng(4)
    for _ in range(200):
        logits = rng.integers(0, 3, size=(1, 1000)).astype(np.float32)
        k = int(rng.integers(1, 20))
        assert [item["index"] for item in top_k(logits, k, LABELS)[0]] == stable_top(logits, k)[0]


def test_top_k_clamps_k_to_the_class_count() -> None:
    logits = np.array([[1.0, 3.0, 2.0], [0.0, 0.0, 1.0]], dtype=np.float32)
    answers = top_k(logits, 10, ["a", "b", "c"])
    assert [[item["label"] for item in answer] for answer in answers] == [["b", "c", "a"], ["c", "a", "b"]]
    assert all(abs(sum(item["score"] for item in answer) - 1) <= 1e-6 for answer in answers)


def test_top_k_labels_follow_the_class_index_of_a_fine_tuned_head() -> None:
    # Softmax over the classes of each row (axis 1), not over the batch: the second row's scores sum to 1 too.
    logits = np.array([[0.0, 5.0, 1.0, 0.0], [9.0, 0.0, 0.0, 8.0]], dtype=np.float32)
    answers = top_k(logits, 2, ["zero", "one", "two", "three"])
    assert [[(a["index"], a["label"]) for a in answer] for answer in answers] == [
        [(1, "one"), (2, "two")],
        [(0, "zero"), (3, "three")],
    ]
    np.testing.assert_allclose([a["score"] for a in answers[1]], reference_softmax(logits)[1, [0, 3]], rtol=1e-6)


@pytest.mark.parametrize(("width", "labels"), [(4, 3), (4, 5), (0, 0)])
def test_top_k_refuses_labels_that_do_not_name_the_classes(width: int, labels: int) -> None:
    with pytest.raises(ValueError, match="labels for 4 classes" if width else "at least one class"):
        top_k(np.zeros((2, width), dtype=np.float32), 1, [f"l{i}" for i in range(labels)])


# --- l2_normalize -------------------------------------------------------------------------------------------------


def test_l2_normalize_gives_unit_norms() -> None:
    emb = (np.random.default_rng(5).standard_normal((8, 2048)) * 7).astype(np.float32)
    emb[3] *= 1e-12  # tiny but non-zero: still normalised
    original = emb.copy()
    out = l2_normalize(emb)
    norms = np.linalg.norm(out.astype(np.float64), axis=1)
    print(f"\nl2_normalize: max |norm - 1| {np.abs(norms - 1).max():.2e}")
    assert np.abs(norms - 1).max() <= 1e-6
    np.testing.assert_array_equal(emb, original)  # input left untouched
    cos = np.sum(out * original, axis=1) / np.linalg.norm(original, axis=1)
    assert np.abs(cos - 1).max() <= 1e-6  # same direction


def test_l2_normalize_leaves_zero_rows_at_zero() -> None:
    emb = np.zeros((3, 16), dtype=np.float32)
    emb[1] = np.arange(16)
    out = l2_normalize(emb)  # filterwarnings=error: a 0/0 would fail here
    assert np.isfinite(out).all()
    np.testing.assert_array_equal(out[[0, 2]], 0.0)
    assert abs(float(np.linalg.norm(out[1])) - 1) <= 1e-6
