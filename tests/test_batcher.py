"""The dynamic batcher on a fake model: coalescing, spanning, failures, cancellation, deadlines, shutdown."""

from __future__ import annotations

import asyncio
import threading

import numpy as np
import pytest

from service.core.request.batching import Batcher, BatcherStopped, DeadlineExceeded, InferenceFailed, QueueFull
from tests.conftest import run, until
from tests.fakes import FAKE_SIZE, FakeModel, fake_outputs


def images(n: int, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.standard_normal((3, FAKE_SIZE, FAKE_SIZE), dtype=np.float32) for _ in range(n)]


def expected(arrays: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """What each image gives when inferred alone."""
    rows = [fake_outputs(a[None]) for a in arrays]
    return np.concatenate([r[0] for r in rows]), np.concatenate([r[1] for r in rows])


def make(model: FakeModel, **kwargs: object) -> Batcher:
    options = {"max_batch": 4, "max_queue": 32, **kwargs}
    batcher = Batcher(model, **options)  # type: ignore[arg-type]
    batcher.start()
    return batcher


def test_idle_batcher_runs_a_lone_request_at_once() -> None:
    async def main() -> None:
        # A model call that takes real time, so "at once" has a yardstick measured in the same run: the
        # batcher may add less than the model call itself (a worker that polled or idled first would not).
        model = FakeModel(delay=0.05)
        batcher = make(model)
        arrays = images(1)
        loop = asyncio.get_running_loop()
        start = loop.time()
        ticket = batcher.submit(arrays, timeout=5)
        logits, _ = await batcher.wait(ticket)
        elapsed = loop.time() - start
        np.testing.assert_allclose(logits, expected(arrays)[0], rtol=1e-5, atol=1e-5)
        assert model.batches == [1]
        assert ticket.queue_wait is not None and ticket.queue_wait < ticket.inference_time, (ticket, elapsed)
        assert elapsed < 2 * ticket.inference_time, (ticket, elapsed)
        await batcher.stop(5)

    run(main())


def test_requests_queued_during_a_batch_share_the_next_one() -> None:
    async def main() -> None:
        model = FakeModel()
        model.gate = threading.Event()
        batcher = make(model, max_batch=8)
        first = batcher.submit(images(1, seed=99), timeout=10)
        await until(lambda: model.calls == 1)  # the first batch is now running, blocked on the gate
        inputs = [images(1, seed=i) for i in range(5)]
        tickets = [batcher.submit(a, timeout=10) for a in inputs]
        model.gate.set()
        await batcher.wait(first)
        results = [await batcher.wait(t) for t in tickets]
        assert model.batches == [1, 5], model.batches
        for arrays, (logits, emb) in zip(inputs, results, strict=True):
            want_logits, want_emb = expected(arrays)
            np.testing.assert_allclose(logits, want_logits, rtol=1e-5, atol=1e-5)
            np.testing.assert_allclose(emb, want_emb, rtol=1e-5, atol=1e-5)
        await batcher.stop(5)

    run(main())


def test_a_request_larger_than_a_batch_spans_batches_in_order() -> None:
    async def main() -> None:
        model = FakeModel()
        batcher = make(model, max_batch=4)
        arrays = images(10, seed=3)
        ticket = batcher.submit(arrays, timeout=10)
        logits, emb = await batcher.wait(ticket)
        assert model.batches == [4, 4, 2]
        want_logits, want_emb = expected(arrays)
        np.testing.assert_allclose(logits, want_logits, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(emb, want_emb, rtol=1e-5, atol=1e-5)
        assert ticket.batches == 3
        await batcher.stop(5)

    run(main())


def test_idle_delay_fills_a_batch() -> None:
    async def main() -> None:
        model = FakeModel()
        delay = 0.2
        batcher = make(model, max_batch=4, max_delay=delay)
        loop = asyncio.get_running_loop()
        t1 = batcher.submit(images(1, 1), timeout=5)
        # The idle worker has taken its wake-up and waits for the batch to fill (it clears the event to wait
        # again), or, wrongly, has already sent the lone image to the model.
        await until(lambda: not batcher._wake.is_set() or model.calls > 0)
        assert model.calls == 0, "an idle worker must hold a lone image for max_delay"
        t2 = batcher.submit(images(2, 2), timeout=5)
        await asyncio.gather(batcher.wait(t1), batcher.wait(t2))
        partial_s = loop.time() - t1.submitted
        assert model.batches == [3]
        assert t1.queue_wait is not None and t1.queue_wait >= delay - 1e-3, "the partial batch waited out the delay"
        # A full batch does not wait for the delay: it is answered in a fraction of the time the partial one
        # took (that one waited `delay` and ran the same model; a full batch that waited would take as long).
        start = loop.time()
        full = batcher.submit(images(4, 3), timeout=5)
        await batcher.wait(full)
        full_s = loop.time() - start
        assert model.batches == [3, 4]
        assert full_s < partial_s / 2, (full_s, partial_s)
        await batcher.stop(5)

    run(main())


def test_a_failing_batch_fails_only_its_requests() -> None:
    async def main() -> None:
        model = FakeModel()
        model.gate = threading.Event()
        batcher = make(model, max_batch=2)
        doomed = [batcher.submit(images(1, i), timeout=10) for i in range(2)]

        def fail_once(batch: np.ndarray) -> None:
            model.fail = None
            raise RuntimeError("CUDA error: an illegal memory access was encountered")

        model.fail = fail_once
        survivors_inputs = [images(1, 10 + i) for i in range(2)]
        survivors = [batcher.submit(a, timeout=10) for a in survivors_inputs]
        model.gate.set()
        for ticket in doomed:
            with pytest.raises(InferenceFailed):
                await batcher.wait(ticket)
        for arrays, ticket in zip(survivors_inputs, survivors, strict=True):
            logits, _ = await batcher.wait(ticket)
            np.testing.assert_allclose(logits, expected(arrays)[0], rtol=1e-5, atol=1e-5)
        assert batcher.alive
        await batcher.stop(5)

    run(main())


def test_cancelled_requests_never_reach_the_model() -> None:
    async def main() -> None:
        model = FakeModel()
        model.gate = threading.Event()
        batcher = make(model, max_batch=8)
        first = batcher.submit(images(1), timeout=10)
        await until(lambda: model.calls == 1)
        gone = batcher.submit(images(3, 5), timeout=10)
        stays = batcher.submit(images(2, 6), timeout=10)
        waiting = asyncio.Event()

        async def client() -> object:
            waiting.set()  # the task runs on, without yielding, until it waits on its ticket inside wait()
            return await batcher.wait(gone)

        waiter = asyncio.ensure_future(client())
        await waiting.wait()
        waiter.cancel()  # what a client disconnect does to its request
        with pytest.raises(asyncio.CancelledError):
            await waiter
        assert batcher.depth == 2
        model.gate.set()
        await batcher.wait(first)
        await batcher.wait(stays)
        assert model.batches == [1, 2], model.batches
        await batcher.stop(5)

    run(main())


def test_full_queue_refuses_at_once_with_retry_after() -> None:
    async def main() -> None:
        model = FakeModel()
        model.gate = threading.Event()
        batcher = make(model, max_batch=2, max_queue=4)
        running = batcher.submit(images(1), timeout=10)
        await until(lambda: model.calls == 1)
        queued = batcher.submit(images(4), timeout=10)
        with pytest.raises(QueueFull) as refused:
            batcher.submit(images(1), timeout=10)
        assert refused.value.retry_after >= 1
        assert batcher.depth == 4  # nothing of the refused request was queued
        model.gate.set()
        await batcher.wait(running)
        await batcher.wait(queued)
        await batcher.stop(5)

    run(main())


def test_deadline_gives_up_and_the_worker_recovers_from_a_stuck_run() -> None:
    async def main() -> None:
        model = FakeModel()
        model.gate = threading.Event()
        batcher = make(model, max_batch=2)
        stuck = batcher.submit(images(1), timeout=0.2)
        await until(lambda: model.calls == 1)
        queued = batcher.submit(images(1, 2), timeout=0.2)
        with pytest.raises(DeadlineExceeded):
            await batcher.wait(stuck)
        with pytest.raises(DeadlineExceeded):
            await batcher.wait(queued)
        # The stuck run began before `queued` was submitted, so the stall is at least as old as that request.
        queued_age = asyncio.get_running_loop().time() - queued.submitted
        assert batcher.stalled_for() >= queued_age > 0.2 - 1e-3
        model.gate.set()  # the stuck run returns
        arrays = images(1, 7)
        logits, _ = await batcher.wait(batcher.submit(arrays, timeout=5))
        np.testing.assert_allclose(logits, expected(arrays)[0], rtol=1e-5, atol=1e-5)
        assert model.batches == [1, 1], "the expired request must not have been inferred"
        assert batcher.stalled_for() == 0.0
        await batcher.stop(5)

    run(main())


class WorkerKilled(BaseException):
    """Not an Exception: escapes the per-batch error handling, as a bug in the loop itself would."""


def test_worker_death_fails_pending_work_and_reports_dead() -> None:
    async def main() -> None:
        model = FakeModel()
        model.gate = threading.Event()
        batcher = make(model, max_batch=1)

        def die(batch: np.ndarray) -> None:
            raise WorkerKilled

        model.fail = die
        first = batcher.submit(images(1), timeout=5)
        await until(lambda: model.calls == 1)
        pending = batcher.submit(images(1, 1), timeout=5)
        model.gate.set()
        with pytest.raises((BatcherStopped, InferenceFailed)):
            await batcher.wait(first)
        with pytest.raises(BatcherStopped):
            await batcher.wait(pending)
        assert not batcher.alive
        assert isinstance(batcher.error, WorkerKilled)
        with pytest.raises(BatcherStopped):
            batcher.submit(images(1), timeout=5)
        await batcher.stop(1)

    run(main())


def test_stop_finishes_queued_work_then_refuses() -> None:
    async def main() -> None:
        model = FakeModel(delay=0.02)
        batcher = make(model, max_batch=2)
        tickets = [batcher.submit(images(1, i), timeout=10) for i in range(5)]
        waits = [asyncio.ensure_future(batcher.wait(t)) for t in tickets]
        await batcher.stop(10)
        done = await asyncio.gather(*waits)
        assert len(done) == 5 and sum(model.batches) == 5
        with pytest.raises(BatcherStopped):
            batcher.submit(images(1), timeout=5)

    run(main())


def test_padding_to_fixed_shapes_keeps_answers_exact() -> None:
    async def main() -> None:
        model = FakeModel()
        batcher = make(model, max_batch=8, pad_to=[1, 2, 4, 8])
        arrays = images(3, 4)
        logits, emb = await batcher.wait(batcher.submit(arrays, timeout=5))
        assert model.batches == [4]
        want_logits, want_emb = expected(arrays)
        np.testing.assert_allclose(logits, want_logits, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(emb, want_emb, rtol=1e-5, atol=1e-5)
        await batcher.stop(5)

    run(main())


class FeatureFake(FakeModel):
    """A fake that also has a feature map: each image's first channel, pooled 8 x 8 (input-dependent)."""

    def __init__(self) -> None:
        super().__init__()
        self.feature_batches: list[int] = []

    def infer_features(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        logits, embedding = self.infer(images)
        self.feature_batches.append(len(images))
        n, _, s, _ = images.shape
        return logits, embedding, images[:, :1].reshape(n, 1, s // 8, 8, s // 8, 8).mean(axis=(3, 5))


def test_only_a_batch_holding_a_request_for_the_feature_map_fetches_it() -> None:
    async def main() -> None:
        model = FeatureFake()
        model.gate = threading.Event()
        batcher = make(model, max_batch=8)
        first = batcher.submit(images(1, seed=99), timeout=10)
        await until(lambda: model.calls == 1)  # the first batch is inside the model: the next two queue up
        plain_arrays, explain_arrays = images(2, seed=1), images(3, seed=2)
        plain = batcher.submit(plain_arrays, timeout=10)
        explain = batcher.submit(explain_arrays, timeout=10, features=True)
        model.gate.set()
        await batcher.wait(first)
        plain_logits, _ = await batcher.wait(plain)
        explain_logits, _ = await batcher.wait(explain)
        assert model.batches == [1, 5] and model.feature_batches == [5]  # one shared batch, fetched once
        np.testing.assert_allclose(plain_logits, expected(plain_arrays)[0], rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(explain_logits, expected(explain_arrays)[0], rtol=1e-5, atol=1e-5)
        assert first.feature_maps is None and plain.feature_maps is None  # nobody else gets (or pays for) them
        assert explain.feature_maps is not None and explain.feature_maps.shape == (3, 1, 4, 4)
        want = np.stack([a[:1].reshape(1, 4, 8, 4, 8).mean(axis=(2, 4)) for a in explain_arrays])
        np.testing.assert_allclose(explain.feature_maps, want, rtol=1e-6)
        await batcher.stop(5)

    run(main())
