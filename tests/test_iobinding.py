"""IO binding and the CUDA-graph setting on the CPU EP: same answers as session.run, and honest reporting."""

from __future__ import annotations

import asyncio
from pathlib import Path

import numpy as np
import pytest

from service.core.request.batching import Batcher, InferenceFailed
from service.core.request.inference import OrtModel, warm_up
from tests.conftest import TINY_SIZE, run, settings


def _model(path: Path, **overrides: object) -> OrtModel:
    config = settings(model_path=path, providers="cpu", **overrides)
    model = OrtModel(config)
    warm_up(model, config.batch_shapes())
    return model


def _images(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, 3, TINY_SIZE, TINY_SIZE), dtype=np.float32)


def test_io_binding_gives_the_outputs_of_session_run(tiny_onnx: Path) -> None:
    plain, bound = _model(tiny_onnx, io_binding=False), _model(tiny_onnx, io_binding=True)
    assert plain.acceleration["path"] == "plain" and bound.acceleration["path"] == "io_binding"
    assert bound.acceleration["io_binding"] | {"batch_sizes": None} == {
        "requested": True, "active": True, "device": "cpu", "batch_sizes": None, "pinned_host_buffers": False,
        "reason": "",
    }  # fmt: skip
    for n in (1, 2, 3, 4):  # 3 is outside the warmed shapes [1, 2, 4]: the plain path answers it
        for seed in range(2):  # a reused buffer must not leak one batch into the next
            x = _images(n, seed)
            for a, b in zip(plain.infer(x), bound.infer(x), strict=True):
                np.testing.assert_array_equal(a, b)


def test_returned_outputs_do_not_alias_the_reused_buffers(tiny_onnx: Path) -> None:
    model = _model(tiny_onnx)
    first = model.infer(_images(2, 0))
    kept = [a.copy() for a in first]
    model.infer(_images(2, 1))
    for a, b in zip(first, kept, strict=True):
        np.testing.assert_array_equal(a, b)


def test_cuda_graphs_on_the_cpu_ep_fall_back_to_the_plain_path_and_say_so(tiny_onnx: Path) -> None:
    model = _model(tiny_onnx, cuda_graphs=True)
    graphs = model.acceleration["cuda_graphs"]
    assert graphs["requested"] is True and graphs["active"] is False and graphs["captured"] == []
    assert "CUDA EP is not active" in graphs["reason"] and "CPUExecutionProvider" in graphs["reason"]
    assert model.acceleration["path"] == "io_binding" and model.warm_up_runs == 1
    np.testing.assert_array_equal(model.infer(_images(4))[0], _model(tiny_onnx, io_binding=False).infer(_images(4))[0])


def test_cuda_graphs_without_io_binding_name_the_missing_setting(tiny_onnx: Path) -> None:
    graphs = _model(tiny_onnx, cuda_graphs=True, io_binding=False).acceleration["cuda_graphs"]
    assert graphs["active"] is False and "RESNEST_IO_BINDING" in graphs["reason"]


def test_the_batcher_stacks_into_the_models_buffer(tiny_onnx: Path) -> None:
    model = _model(tiny_onnx)
    images = _images(2)

    async def main() -> None:
        batcher = Batcher(model, max_batch=4, max_queue=8, cut_to=[1, 2, 4])
        batcher.start()
        ticket = batcher.submit(list(images), timeout=30.0)
        await ticket.future
        await batcher.stop(1.0)

    run(main())
    with model.input_buffer(2) as buffer:
        assert buffer is not None  # written once, where the runtime reads it
        np.testing.assert_array_equal(buffer, images)
    with model.input_buffer(3) as buffer:
        assert buffer is None  # not a warmed shape: the batcher allocates as before


def test_a_batch_that_cannot_be_stacked_fails_its_requests_and_the_worker_goes_on(tiny_onnx: Path) -> None:
    model = _model(tiny_onnx)

    async def main() -> tuple[BaseException | None, bool, np.ndarray]:
        batcher = Batcher(model, max_batch=4, max_queue=8, max_delay=0.2, cut_to=[1, 2, 4])
        batcher.start()
        # Two requests whose rows differ in shape land in one batch: stacking them fails (on the inference
        # thread, inside the batch's try), and only their requests fail.
        bad = batcher.submit([_images(1)[0][:, :8, :8]], timeout=30.0)
        good_shape = batcher.submit(list(_images(1)), timeout=30.0)
        # (A worker that died on the batch would leave these futures unresolved: 30 s is a hang guard.)
        await asyncio.wait_for(asyncio.gather(bad.future, good_shape.future, return_exceptions=True), 30)
        after = batcher.submit(list(_images(1, 3)), timeout=30.0)
        logits, _ = await batcher.wait(after)
        alive = batcher.alive
        await batcher.stop(1.0)
        return bad.future.exception(), alive, logits

    error, alive, logits = run(main())
    assert isinstance(error, InferenceFailed)
    assert alive  # the worker survived the batch, and /healthz stays 200
    np.testing.assert_array_equal(logits, _model(tiny_onnx, io_binding=False).infer(_images(1, 3))[0])


def test_a_batch_of_the_wrong_dtype_is_refused(tiny_onnx: Path) -> None:
    with pytest.raises(ValueError, match="float32"):
        _model(tiny_onnx).infer(_images(1).astype(np.float64))
