"""Numerical parity of every models/ variant with the official ResNeSt implementation (resnest==0.0.5)."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import resnest.torch as official_zoo
import torch
from resnest.torch.resnet import Bottleneck, ResNet
from torch import nn

import models
from models.split_attn import RadixSoftmax

TOL = 1e-5
BATCH = 2
BIG = ("resnest200", "resnest269", "resnest200e", "resnest269e")
BIG_INPUT = 128  # the big variants run at 128x128 to keep CI time sane

# Our names with an official constructor; timm's 50d/101e/200e/269e are the same networks.
FAST_SPECS = ("1s1x64d", "2s1x64d", "4s1x64d", "1s2x40d", "2s2x40d", "4s2x40d", "1s4x24d")
FAST = tuple(f"resnest50_fast_{s}" for s in FAST_SPECS)
OFFICIAL_CONSTRUCTORS: dict[str, str] = {
    **{n: n for n in ("resnest50", "resnest101", "resnest200", "resnest269", *FAST)},
    "resnest50d": "resnest50",
    "resnest101e": "resnest101",
    "resnest200e": "resnest200",
    "resnest269e": "resnest269",
}
# timm-only shapes, as timm defines them (layers, radix, cardinality, width, stem width, avd_first); the official
# ResNet class builds them from VARIANTS, and test_timm_only_variants_match_timm checks VARIANTS against this table.
TIMM_ONLY: dict[str, tuple[tuple[int, int, int, int], int, int, int, int, bool]] = {
    "resnest14d": ((1, 1, 1, 1), 2, 1, 64, 32, False),
    "resnest26d": ((2, 2, 2, 2), 2, 1, 64, 32, False),
    "resnest50d_4s2x40d": ((3, 4, 6, 3), 4, 2, 40, 32, True),
    "resnest50d_1s4x24d": ((3, 4, 6, 3), 1, 4, 24, 32, True),
}
ALL_NAMES = sorted([*OFFICIAL_CONSTRUCTORS, *TIMM_ONLY])


@dataclass
class Figures:
    variant: str
    size: int
    logits_diff: float
    embedding_diff: float
    logit_scale: float


FIGURES: list[Figures] = []


@pytest.fixture(scope="module", autouse=True)
def _figures_table(request: pytest.FixtureRequest) -> Iterator[None]:
    """Print the parity figures collected by the tests as one table when the module finishes."""
    yield
    if not FIGURES:
        return
    lines = [f"{'variant':<24} {'input':>5} {'max|dlogits|':>13} {'max|demb|':>11} {'logit scale':>12}"]
    lines += [
        f"{f.variant:<24} {f.size:>5} {f.logits_diff:>13.3e} {f.embedding_diff:>11.3e} {f.logit_scale:>12.4g}"
        for f in sorted(FIGURES, key=lambda f: f.variant)
    ]
    title = f"ResNeSt parity vs official (fp32 CPU, batch {BATCH}, tol {TOL:g})"
    reporter = request.config.pluginmanager.get_plugin("terminalreporter")
    capture = request.config.pluginmanager.get_plugin("capturemanager")
    if reporter is None or capture is None:
        print("\n".join(["", title, *lines]))
        return
    with capture.global_and_fixture_disabled():  # what capsys.disabled() does: show it without -s too
        reporter.write_line("")
        reporter.write_sep("-", title)
        for line in lines:
            reporter.write_line(line)


def build_official(name: str) -> nn.Module:
    """The official implementation of `name`, with its default (untrained) weights."""
    if name in OFFICIAL_CONSTRUCTORS:
        constructor: Callable[[], nn.Module] = getattr(official_zoo, OFFICIAL_CONSTRUCTORS[name])
        return constructor()
    v = models.VARIANTS[name]
    return ResNet(
        Bottleneck,
        list(v.layers),
        radix=v.radix,
        groups=v.cardinality,
        bottleneck_width=v.bottleneck_width,
        deep_stem=True,
        stem_width=v.stem_width,
        avg_down=True,
        avd=True,
        avd_first=v.avd_first,
    )


def random_pair(name: str, seed: int) -> tuple[nn.Module, models.ResNeSt]:
    """(official, ours): the official model randomised by init_random, its weights loaded strictly into ours."""
    official = models.init_random(build_official(name), seed).eval()
    ours = models.create_model(name)
    ours.load_state_dict(official.state_dict(), strict=True)
    return official, ours


def input_size(name: str) -> int:
    return BIG_INPUT if name in BIG else models.VARIANTS[name].data.input_size


def images(n: int, size: int, seed: int) -> torch.Tensor:
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


def max_abs(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).abs().max().item()


def official_logits_and_embedding(official: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Official logits and the output of its `avgpool` (the pooled embedding), captured with a forward hook."""
    captured: list[torch.Tensor] = []
    handle = official.avgpool.register_forward_hook(lambda _m, _i, out: captured.append(out.detach().clone()))
    try:
        logits = official(x)
    finally:
        handle.remove()
    assert len(captured) == 1
    return logits, torch.flatten(captured[0], 1)


def test_name_table_covers_every_variant() -> None:
    assert models.list_models() == ALL_NAMES


@pytest.mark.parametrize("name", [pytest.param(n, marks=pytest.mark.slow) if n in BIG else n for n in ALL_NAMES])
@torch.no_grad()
def test_parity_with_official(name: str) -> None:
    seed = ALL_NAMES.index(name)
    official, ours = random_pair(name, seed)
    size = input_size(name)
    x = images(BATCH, size, seed + 100)

    ref_logits, ref_embedding = official_logits_and_embedding(official, x)
    logits = ours(x)
    embedding = ours.forward_embedding(x)

    assert logits.shape == (BATCH, 1000)
    assert embedding.shape == (BATCH, 2048)
    assert ref_embedding.shape == (BATCH, 2048)
    figures = Figures(
        name, size, max_abs(logits, ref_logits), max_abs(embedding, ref_embedding), ref_logits.abs().max().item()
    )
    FIGURES.append(figures)
    print(
        f"\n{name} @ {size}: max|dlogits| {figures.logits_diff:.3e}, max|dembedding| {figures.embedding_diff:.3e}, "
        f"logit scale {figures.logit_scale:.4g}"
    )
    # The comparison only means something if the network responds to its input (init_random's purpose).
    assert max_abs(ref_logits[0], ref_logits[1]) > 1e-3 * figures.logit_scale
    assert figures.logits_diff <= TOL
    assert figures.embedding_diff <= TOL


def test_resnest50_key_count_is_official() -> None:
    ours = models.create_model("resnest50")
    keys = list(ours.state_dict())
    assert len(keys) == 476
    assert sum(k.endswith("num_batches_tracked") for k in keys) == 71
    assert keys == list(official_zoo.resnest50().state_dict())


@pytest.mark.parametrize("name", sorted(TIMM_ONLY))
def test_timm_only_variants_match_timm(name: str) -> None:
    v = models.VARIANTS[name]
    assert (v.layers, v.radix, v.cardinality, v.bottleneck_width, v.stem_width, v.avd_first) == TIMM_ONLY[name]


@pytest.mark.parametrize("name", ["resnest14d", "resnest50d_4s2x40d"])
@pytest.mark.parametrize("size", [224, 96])
@torch.no_grad()
def test_entry_points_agree(name: str, size: int) -> None:
    ours = models.create_model(name, seed=3)
    x = images(3, size, 7)
    features = ours.forward_features(x)
    assert features.shape == (3, 2048, size // 32, size // 32)
    embedding = ours.forward_embedding(x)
    assert embedding.shape == (3, 2048)
    assert max_abs(embedding, features.mean((2, 3))) <= TOL
    assert max_abs(ours.fc(embedding), ours(x)) <= TOL


class _RadixSoftmaxWithoutTranspose(nn.Module):
    """The classic layout bug: softmax over the radix axis without swapping fc2's cardinality-major order."""

    def __init__(self, radix: int, cardinality: int, channels: int) -> None:
        super().__init__()
        self.radix, self.cardinality, self.channels = radix, cardinality, channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.reshape(-1, self.radix, self.cardinality, self.channels // self.cardinality).softmax(dim=1)
        return x.reshape(-1, self.radix * self.channels, 1, 1)


def _swap_fc2_radix_halves(ours: models.ResNeSt) -> None:
    fc2 = ours.layer1[0].conv2.fc2
    half = fc2.out_channels // 2
    assert not torch.equal(fc2.weight[:half], fc2.weight[half:])
    fc2.weight.copy_(torch.cat([fc2.weight[half:], fc2.weight[:half]]))
    fc2.bias.copy_(torch.cat([fc2.bias[half:], fc2.bias[:half]]))


def _drop_rsoftmax_transpose(ours: models.ResNeSt) -> None:
    replaced = 0
    for module in ours.modules():
        if isinstance(getattr(module, "rsoftmax", None), RadixSoftmax):
            old = module.rsoftmax
            module.rsoftmax = _RadixSoftmaxWithoutTranspose(old.radix, old.cardinality, old.channels)
            replaced += 1
    assert replaced > 0


@pytest.mark.parametrize(
    ("name", "corrupt"),
    [("resnest14d", _swap_fc2_radix_halves), ("resnest50d_4s2x40d", _drop_rsoftmax_transpose)],
    ids=["fc2-radix-halves-swapped", "rsoftmax-without-transpose"],
)
@torch.no_grad()
def test_wrong_split_attention_layout_is_caught(name: str, corrupt: Callable[[models.ResNeSt], None]) -> None:
    official, ours = random_pair(name, seed=11)
    x = images(BATCH, 64, 12)
    reference = official(x)
    assert max_abs(ours(x), reference) <= TOL  # the intact model passes ...
    corrupt(ours)
    diff = max_abs(ours(x), reference)
    scale = reference.abs().max().item()
    print(f"\n{name} with a corrupted split-attention layout: max|dlogits| {diff:.3e} at logit scale {scale:.4g}")
    assert diff > 1e3 * TOL  # ... and the broken one fails by orders of magnitude
    assert diff > 1e-3 * scale


@pytest.mark.parametrize("name", ["resnest14d", "resnest50d_4s2x40d"])
def test_export_with_symbolic_batch(name: str) -> None:
    ours = models.create_model(name, seed=5)
    size = models.VARIANTS[name].data.input_size
    batch = torch.export.Dim("batch", min=1, max=64)
    program = torch.export.export(ours, (images(2, size, 0),), dynamic_shapes=({0: batch},))
    exported = program.module()
    with torch.no_grad():
        for n in (1, 3):
            x = images(n, size, n)
            out = exported(x)
            assert out.shape == (n, 1000)
            assert max_abs(out, ours(x)) <= TOL


def test_models_does_not_import_service_or_export() -> None:
    code = "import models, sys; assert not any(m.split('.')[0] in ('service', 'export') for m in sys.modules)"
    root = Path(__file__).resolve().parents[1]
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=root, capture_output=True, text=True, timeout=120, check=False
    )
    assert result.returncode == 0, result.stderr


def test_list_models_is_the_19_published_variants() -> None:
    expected = {
        "resnest50", "resnest101", "resnest200", "resnest269", *FAST,
        "resnest14d", "resnest26d", "resnest50d", "resnest101e", "resnest200e", "resnest269e",
        "resnest50d_4s2x40d", "resnest50d_1s4x24d",
    }  # fmt: skip
    names = models.list_models()
    assert len(names) == 19
    assert set(names) == expected
    assert names == sorted(names)


def test_unknown_variant_raises_value_error_naming_known_ones() -> None:
    with pytest.raises(ValueError, match="resnest42") as excinfo:
        models.create_model("resnest42")
    message = str(excinfo.value)
    assert all(name in message for name in models.list_models())


@pytest.mark.parametrize("name", ALL_NAMES)
def test_data_config(name: str) -> None:
    data = models.VARIANTS[name].data
    assert models.VARIANTS[name].name == name
    assert data.mean == pytest.approx((0.485, 0.456, 0.406))
    assert data.std == pytest.approx((0.229, 0.224, 0.225))
    assert data.input_size in {224, 256, 320, 416}
    assert data.resize_size > data.input_size
    assert data.interpolation in {"bilinear", "bicubic"}
