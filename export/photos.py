"""Real photographs usable offline: the sample images that ship inside the scikit-image wheel."""

from __future__ import annotations

from pathlib import Path

# Natural photographs of several sizes and formats (a greyscale one exercises the L -> RGB path).
PHOTOS = (
    "chelsea.png", "coffee.png", "rocket.jpg", "astronaut.png",
    "motorcycle_left.png", "hubble_deep_field.jpg", "retina.jpg", "camera.png",
)  # fmt: skip
# Other photographs from the same wheel, none of them in PHOTOS: the int8 export calibrates on PHOTOS by
# default, and its accuracy report needs images calibration did not see. Textures, coins, the moon, cells
# under a microscope, a motion-blurred clock, a scanned page. motorcycle_right.png is left out: it is the
# other view of a stereo pair whose left view is in PHOTOS, so it is not unseen.
HELDOUT_PHOTOS = (
    "brick.png", "coins.png", "grass.png", "gravel.png", "moon.png",
    "ihc.png", "cell.png", "clock_motion.png", "microaneurysms.png", "page.png",
)  # fmt: skip


def photo_dir() -> Path:
    """scikit-image's bundled data folder (ImportError if scikit-image is not installed)."""
    import skimage

    return Path(skimage.__file__).parent / "data"


def sample_photos() -> list[tuple[str, bytes]]:
    """(name, encoded bytes) of the bundled photographs, in a fixed order."""
    folder = photo_dir()
    return [(name, (folder / name).read_bytes()) for name in PHOTOS]


def heldout_photos() -> list[tuple[str, bytes]]:
    """(name, encoded bytes) of the photographs that are not in sample_photos(), in a fixed order."""
    folder = photo_dir()
    return [(name, (folder / name).read_bytes()) for name in HELDOUT_PHOTOS]
