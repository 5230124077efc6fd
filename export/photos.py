"""Real photographs usable offline: the sample images that ship inside the scikit-image wheel."""

from __future__ import annotations

from pathlib import Path

# Natural photographs of several sizes and formats (a greyscale one exercises the L -> RGB path).
PHOTOS = (
    "chelsea.png", "coffee.png", "rocket.jpg", "astronaut.png",
    "motorcycle_left.png", "hubble_deep_field.jpg", "retina.jpg", "camera.png",
)  # fmt: skip


def photo_dir() -> Path:
    """scikit-image's bundled data folder (ImportError if scikit-image is not installed)."""
    import skimage

    return Path(skimage.__file__).parent / "data"


def sample_photos() -> list[tuple[str, bytes]]:
    """(name, encoded bytes) of the bundled photographs, in a fixed order."""
    folder = photo_dir()
    return [(name, (folder / name).read_bytes()) for name in PHOTOS]
