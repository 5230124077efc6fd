"""The published ResNeSt variants: architecture hyper-parameters, data config and weights, in one table."""

from __future__ import annotations

from dataclasses import dataclass

from modelcard import PreprocessConfig

_OFFICIAL = "https://github.com/zhanghang1989/ResNeSt/releases/download/weights_step1/{}.pth"
_TIMM_GLUON = "https://github.com/rwightman/pytorch-image-models/releases/download/v0.1-weights/{}.pth"


@dataclass(frozen=True)
class Variant:
    """One buildable model: network shape, preprocessing and (optionally) published weights."""

    name: str
    layers: tuple[int, int, int, int]
    radix: int
    cardinality: int
    bottleneck_width: int
    stem_width: int
    avd_first: bool
    data: PreprocessConfig  # evaluation preprocessing of the published weights (timm's pretrained_cfg)
    source: str  # "official" (zhanghang1989/ResNeSt) or "timm"
    weights_url: str | None = None
    top1: float | None = None  # published ImageNet top-1 (%), where the source states one


def _official_data(size: int) -> PreprocessConfig:
    # The official verify script crops size/(size+32) of the shorter side and resizes bicubically.
    return PreprocessConfig(size, size + 32, "bicubic")


def _timm_data(size: int, crop_pct: float, interpolation: str) -> PreprocessConfig:
    return PreprocessConfig.from_crop_pct(size, crop_pct, interpolation)


def _fast(spec: str, digest: str) -> Variant:
    radix, rest = spec.split("s")
    cardinality, width = rest.rstrip("d").split("x")
    name = f"resnest50_fast_{spec}"
    return Variant(
        name=name,
        layers=(3, 4, 6, 3),
        radix=int(radix),
        cardinality=int(cardinality),
        bottleneck_width=int(width),
        stem_width=32,
        avd_first=True,
        data=_official_data(224),
        source="official",
        weights_url=_OFFICIAL.format(f"{name}-{digest}"),
    )


_R50, _R101, _R200, _R269 = (3, 4, 6, 3), (3, 4, 23, 3), (3, 24, 36, 3), (3, 30, 48, 8)

# fmt: off
VARIANTS: dict[str, Variant] = {
    v.name: v
    for v in (
        Variant("resnest50", _R50, 2, 1, 64, 32, False, _official_data(224), "official",
                _OFFICIAL.format("resnest50-528c19ca"), 81.03),
        Variant("resnest101", _R101, 2, 1, 64, 64, False, _official_data(256), "official",
                _OFFICIAL.format("resnest101-22405ba7"), 82.83),
        Variant("resnest200", _R200, 2, 1, 64, 64, False, _official_data(320), "official",
                _OFFICIAL.format("resnest200-75117900"), 83.84),
        Variant("resnest269", _R269, 2, 1, 64, 64, False, _official_data(416), "official",
                _OFFICIAL.format("resnest269-0cc87c48"), 84.54),
        _fast("1s1x64d", "d8fbf808"),
        _fast("2s1x64d", "44938639"),
        _fast("4s1x64d", "f74f3fc3"),
        _fast("1s2x40d", "32830b84"),
        _fast("2s2x40d", "9d126481"),
        _fast("4s2x40d", "41d14ed0"),
        _fast("1s4x24d", "d4a4f76f"),
        Variant("resnest14d", (1, 1, 1, 1), 2, 1, 64, 32, False, _timm_data(224, 0.875, "bilinear"), "timm",
                _TIMM_GLUON.format("gluon_resnest14-9c8fe254"), 75.5),
        Variant("resnest26d", (2, 2, 2, 2), 2, 1, 64, 32, False, _timm_data(224, 0.875, "bilinear"), "timm",
                _TIMM_GLUON.format("gluon_resnest26-50eb607c"), 78.5),
        Variant("resnest50d", _R50, 2, 1, 64, 32, False, _timm_data(224, 0.875, "bilinear"), "timm",
                _OFFICIAL.format("resnest50-528c19ca"), None),
        Variant("resnest101e", _R101, 2, 1, 64, 64, False, _timm_data(256, 0.875, "bilinear"), "timm",
                _OFFICIAL.format("resnest101-22405ba7"), None),
        Variant("resnest200e", _R200, 2, 1, 64, 64, False, _timm_data(320, 0.909, "bicubic"), "timm",
                _OFFICIAL.format("resnest200-75117900"), None),
        Variant("resnest269e", _R269, 2, 1, 64, 64, False, _timm_data(416, 0.928, "bicubic"), "timm",
                _OFFICIAL.format("resnest269-0cc87c48"), None),
        Variant("resnest50d_4s2x40d", _R50, 4, 2, 40, 32, True, _timm_data(224, 0.875, "bicubic"), "timm",
                _OFFICIAL.format("resnest50_fast_4s2x40d-41d14ed0"), 81.1),
        Variant("resnest50d_1s4x24d", _R50, 1, 4, 24, 32, True, _timm_data(224, 0.875, "bicubic"), "timm",
                _OFFICIAL.format("resnest50_fast_1s4x24d-d4a4f76f"), 81.0),
    )
}
# fmt: on


def get_variant(name: str) -> Variant:
    """Look a variant up by name, with the known names in the error."""
    try:
        return VARIANTS[name]
    except KeyError:
        known = ", ".join(sorted(VARIANTS))
        raise ValueError(f"unknown ResNeSt variant {name!r}; known variants: {known}") from None
