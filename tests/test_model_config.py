"""Per-model batching and limits from the repository's config.pbtxt, in Triton's own fields, with the settings
as defaults; ModelConfig over both OIP transports reports what is in force."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest
import tritonclient.grpc as tg

from service.core.metrics import Metrics
from service.core.repository.config import Batching, ConfigError, ModelConfig, parse_text_format
from service.core.repository.layout import RepositoryError, read_model
from service.core.repository.registry import Registry
from service.core.settings import Settings
from tests.conftest import run, settings
from tests.fakes import FakeModel

# A config.pbtxt as Triton's own documentation writes them: comments, inputs and outputs this service reads from
# the ONNX file itself, an instance group, and the batching fields it does read.
TRITON_CONFIG = """
name: "small"   # the folder's name
platform: "onnxruntime_onnx"
max_batch_size: 4
input [ { name: "images" data_type: TYPE_FP32 dims: [ 3, 64, 64 ] } ]
output [ { name: "logits", data_type: TYPE_FP32, dims: [ 1000 ] }, { name: "embedding" dims: [ 512 ] } ]
instance_group [ { count: 1 kind: KIND_CPU } ]
dynamic_batching {
  preferred_batch_size: [ 2, 4 ]
  max_queue_delay_microseconds: 500
  default_queue_policy { max_queue_size: 32 }
}
version_policy: { latest { num_versions: 1 } }
"""


def test_text_format_reads_what_triton_writes() -> None:
    fields = parse_text_format(TRITON_CONFIG)
    assert fields["max_batch_size"] == [4]
    assert fields["dynamic_batching"][0]["preferred_batch_size"] == [2, 4]
    assert [o["name"] for o in fields["output"]] == [["logits"], ["embedding"]]
    assert fields["instance_group"][0]["kind"] == ["KIND_CPU"]
    assert parse_text_format('name: "a#b"  # a comment\n') == {"name": ["a#b"]}


def test_the_config_overrides_the_settings_field_by_field() -> None:
    batching = ModelConfig.parse(TRITON_CONFIG).batching(settings(max_batch_size=8, max_queue_size=64))
    assert batching == Batching(4, (2, 4), 0.5, 32, False)
    assert batching.shapes() == [2, 4]
    only_size = ModelConfig.parse("max_batch_size: 16").batching(settings(max_queue_delay_ms=2.0, max_queue_size=64))
    assert only_size.shapes() == [1, 2, 4, 8, 16] and only_size.max_queue_delay_ms == 2.0
    assert ModelConfig().batching(settings()) == Batching.defaults(settings())
    assert Batching.defaults(settings()).shapes() == settings().batch_shapes()


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("max_batch_size: 0", "batches every model"),
        ("max_batch_size: 2000", "1 to 1024"),
        ("dynamic_batching { preferred_batch_size: [ 0 ] }", "positive integers"),
        ("dynamic_batching { max_queue_delay_microseconds: -5 }", "0 to 1000000"),
        ("dynamic_batching { default_queue_policy { max_queue_size: 0 } }", "at least 1"),
        ("version_policy: { newest {} }", "unsupported version_policy"),
        ("max_batch_size: { 4 }", "not closed"),
        ('max_batch_size: "4"', "must be one int"),
        ("dynamic_batching {", "not closed"),
    ],
)
def test_configs_that_cannot_be_served_say_why(text: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        ModelConfig.parse(text)


def test_batching_that_does_not_fit_the_settings_is_refused_at_load() -> None:
    with pytest.raises(ConfigError, match="above max_batch_size 4"):
        ModelConfig.parse("max_batch_size: 4 dynamic_batching { preferred_batch_size: [ 8 ] }").batching(settings())
    with pytest.raises(ConfigError, match="RESNEST_MAX_IMAGES_PER_REQUEST"):
        ModelConfig.parse("dynamic_batching { default_queue_policy { max_queue_size: 8 } }").batching(settings())


def test_a_bad_config_makes_its_folder_unservable_with_the_reason(tmp_path: Path) -> None:
    (tmp_path / "m" / "1").mkdir(parents=True)
    (tmp_path / "m" / "1" / "model.onnx").write_bytes(b"onnx")
    (tmp_path / "m" / "config.pbtxt").write_text("max_batch_size: 0")
    with pytest.raises(RepositoryError, match=r"config\.pbtxt: max_batch_size 0"):
        read_model(tmp_path / "m")


def _folder(root: Path, name: str, config: str | None) -> None:
    (root / name / "1").mkdir(parents=True)
    (root / name / "1" / "model.onnx").write_bytes(b"onnx")
    if config is not None:
        (root / name / "config.pbtxt").write_text(config)


def test_each_model_is_warmed_and_batched_as_its_own_config_says(tmp_path: Path) -> None:
    _folder(tmp_path, "small", TRITON_CONFIG)
    _folder(tmp_path, "plain", None)
    built: dict[str, FakeModel] = {}
    shapes_given: dict[str, list[int]] = {}

    def loader(s: Settings, path: Path, shapes: list[int]) -> FakeModel:
        name = path.parent.parent.name
        built[name], shapes_given[name] = FakeModel(), shapes
        return built[name]

    registry = Registry(settings(model_repository=tmp_path, max_batch_size=8), Metrics(), loader=loader)

    async def main() -> dict[str, tuple[int, int, float]]:
        for name in ("small", "plain"):
            await registry.load(read_model(tmp_path / name))
        out = {}
        for served in registry.all():
            batcher = served.batcher
            out[served.name] = (batcher.max_batch, batcher.max_queue, batcher.max_delay)
        await registry.stop_all(1.0)
        return out

    batchers = run(main())
    assert batchers == {"small": (4, 32, 0.0005), "plain": (8, 64, 0.0)}
    assert shapes_given == {"small": [2, 4], "plain": [1, 2, 4, 8]}
    assert built["small"].batches == [2, 4] and built["plain"].batches == [1, 2, 4, 8]  # warm-up, shape by shape


def test_model_config_over_both_protocols_reports_what_is_in_force(
    server_factory, tmp_path: Path, tiny_onnx: Path
) -> None:
    for name, config in (("small", TRITON_CONFIG), ("plain", None)):
        _folder(tmp_path, name, config)
        (tmp_path / name / "1" / "model.onnx").write_bytes(tiny_onnx.read_bytes())
    server = server_factory({"RESNEST_MODEL_REPOSITORY": str(tmp_path), "RESNEST_MAX_BATCH_SIZE": "8"})
    http = {n: httpx.get(f"{server.url}/v2/models/{n}/config", timeout=30).json() for n in ("small", "plain")}
    with tg.InferenceServerClient(server.grpc_target) as client:
        grpc = {n: client.get_model_config(n, as_json=True)["config"] for n in ("small", "plain")}
    assert http["small"]["max_batch_size"] == 4
    assert http["small"]["dynamic_batching"] == {
        "preferred_batch_size": [2, 4],
        "max_queue_delay_microseconds": 500,
        "default_queue_policy": {"max_queue_size": 32},
    }
    assert http["plain"]["max_batch_size"] == 8
    assert http["plain"]["dynamic_batching"]["preferred_batch_size"] == [1, 2, 4, 8]
    for name in ("small", "plain"):
        assert grpc[name]["max_batch_size"] == http[name]["max_batch_size"]
        dynamic = grpc[name]["dynamic_batching"]  # the protobuf JSON form: 64-bit integers as strings
        assert [int(v) for v in dynamic["preferred_batch_size"]] == http[name]["dynamic_batching"][
            "preferred_batch_size"
        ]
        assert (
            int(dynamic.get("max_queue_delay_microseconds", 0))
            == (http[name]["dynamic_batching"]["max_queue_delay_microseconds"])
        )
        assert (
            dynamic["default_queue_policy"]["max_queue_size"]
            == (http[name]["dynamic_batching"]["default_queue_policy"]["max_queue_size"])
        )
    # GET /model says the same of the batch size.
    model = httpx.get(f"{server.url}/model", params={"model": "small"}, timeout=30).json()
    assert model["max_batch_size"] == 4
