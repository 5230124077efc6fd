"""Stage 1, on Ray Data's CPU tasks: each path's bytes read and preprocessed by imaging, as the service does;
a file that cannot become a model input is that row's error, with the service's code and message."""

from __future__ import annotations

from typing import Any

import numpy as np
import pyarrow.fs as pafs

from imaging import ImageError, configure_pillow, preprocess
from modelcard import PreprocessConfig

from .inputs import filesystem

# The service's defaults (service.core.settings.Settings.max_upload_bytes and .max_image_pixels; a test holds
# them equal): a file the service would refuse with 413 is an error row here too. Not imported, since batch
# and service are independent layers.
MAX_FILE_BYTES = 20 * 2**20
MAX_IMAGE_PIXELS = 40_000_000
OK, ERROR = "ok", "error"


def read_file(path: str, max_bytes: int) -> bytes:
    """The file's bytes, refused (as the service refuses the request body) past `max_bytes` before reading."""
    fs, inner = filesystem(path)
    info = fs.get_file_info(inner)
    if info.type != pafs.FileType.File:
        raise ImageError("unreadable", "the file does not exist or is not a regular file")
    if info.size is not None and info.size > max_bytes:
        raise ImageError("payload_too_large", f"the request body exceeds {max_bytes} bytes")
    with fs.open_input_stream(inner) as stream:
        data = stream.read(max_bytes + 1)
    if len(data) > max_bytes:  # grew since the listing
        raise ImageError("payload_too_large", f"the request body exceeds {max_bytes} bytes")
    return data


def decode_one(path: str, cfg: PreprocessConfig, max_bytes: int, max_pixels: int) -> np.ndarray:
    """One path -> the model's input for it, or ImageError with the code and message the service would give."""
    try:
        data = read_file(path, max_bytes)
    except ImageError:
        raise
    except OSError as exc:  # permissions, a vanished object, a flaky remote store
        raise ImageError("unreadable", f"the file cannot be read: {exc.__class__.__name__}: {exc}") from exc
    return preprocess(data, cfg, max_pixels)


def decode_batch(batch: dict[str, np.ndarray], cfg: PreprocessConfig, max_bytes: int = MAX_FILE_BYTES,
                 max_pixels: int = MAX_IMAGE_PIXELS) -> dict[str, Any]:  # fmt: skip
    """A batch of paths -> their tensors (zeros where an image failed), status, error code and message."""
    configure_pillow()  # the service's process-wide Pillow settings; idempotent
    paths = [str(p) for p in batch["path"]]
    tensors = np.zeros((len(paths), *cfg.input_shape), dtype=np.dtype(cfg.input_dtype))
    status, codes, errors = [OK] * len(paths), [""] * len(paths), [""] * len(paths)
    for i, path in enumerate(paths):
        try:
            tensors[i] = decode_one(path, cfg, max_bytes, max_pixels)
        except ImageError as exc:
            status[i], codes[i], errors[i] = ERROR, exc.code, str(exc)
        except Exception as exc:  # a bug's 500 in the service; here one row's error, and the job goes on
            status[i], codes[i], errors[i] = ERROR, "internal", f"{exc.__class__.__name__}: {exc}"
    return {
        "path": np.asarray(paths, dtype=object),
        "tensor": tensors,
        "status": np.asarray(status, dtype=object),
        "error_code": np.asarray(codes, dtype=object),
        "error": np.asarray(errors, dtype=object),
    }
