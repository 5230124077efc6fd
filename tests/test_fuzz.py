"""Property-based fuzzing: the preprocessing of arbitrary and mutated uploads, and the HTTP API against its schema.

Bounded and reproducible: fixed example counts, `derandomize=True` (the same examples on every run) and no
example database, so CI sees exactly what a developer sees.
"""

from __future__ import annotations

import base64
import io
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import TimeoutError as FuturesTimeout

import numpy as np
import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.errors import Unsatisfiable
from PIL import Image
from schemathesis.checks import not_a_server_error
from schemathesis.python import asgi as schemathesis_asgi
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from imaging.transforms import ImageError, preprocess
from modelcard import PreprocessConfig
from service.core.settings import Settings
from service.http.app import create_app
from tests.conftest import jpeg
from tests.fakes import ExplainableFake

CFG = PreprocessConfig(32, 36, "bilinear", (0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
MAX_PIXELS = 1_000_000  # a mutated header may claim any size: keep what the fuzzer may decode small
HANG_S = 10.0
CODES = {"invalid_image", "unsupported_media_type", "image_too_large"}
FUZZ = settings(
    max_examples=200,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)

_pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="fuzz")


def check_preprocess(data: bytes, outcomes: Counter[str], draft: bool = False) -> None:
    """preprocess gives a finite float32 (3, S, S) array or raises ImageError; nothing else, and never hangs."""
    future = _pool.submit(preprocess, data, CFG, MAX_PIXELS, draft)
    try:
        out = future.result(timeout=HANG_S)
    except ImageError as exc:
        assert exc.code in CODES, exc.code
        outcomes[exc.code] += 1
        return
    except FuturesTimeout:
        pytest.fail(f"preprocess did not return within {HANG_S}s on {len(data)} bytes starting {data[:32]!r}")
    assert isinstance(out, np.ndarray) and out.dtype == np.float32 and out.shape == (3, 32, 32)
    assert np.isfinite(out).all()
    outcomes["decoded"] += 1


def test_preprocess_of_arbitrary_bytes_is_an_array_or_image_error() -> None:
    outcomes: Counter[str] = Counter()

    @settings(FUZZ, max_examples=300)
    @given(st.binary(max_size=4096))
    def fuzz(data: bytes) -> None:
        check_preprocess(data, outcomes)

    fuzz()
    print(f"\npreprocess of arbitrary bytes: {dict(outcomes)}")
    assert outcomes["invalid_image"] > 0


# --- mutated valid encodings -------------------------------------------------------------------------------------

# format -> modes Pillow writes for it
MODES = {
    "JPEG": ["L", "RGB", "CMYK"],
    "PNG": ["1", "L", "LA", "P", "RGB", "RGBA", "I;16"],
    "GIF": ["P", "L"],
    "WEBP": ["RGB", "RGBA"],
    "BMP": ["1", "L", "P", "RGB"],
    "TIFF": ["1", "L", "RGB", "RGBA", "CMYK", "I;16", "I", "F"],
}


@st.composite
def encoded_images(draw: st.DrawFn) -> tuple[str, str, bytes]:
    fmt = draw(st.sampled_from(sorted(MODES)))
    mode = draw(st.sampled_from(MODES[fmt]))
    w, h = draw(st.integers(1, 24)), draw(st.integers(1, 24))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    if mode in ("I;16", "I", "F"):
        dtype = {"I;16": np.uint16, "I": np.int32, "F": np.float32}[mode]
        img = Image.fromarray(rng.integers(0, 65535, (h, w)).astype(dtype))
        img = img if img.mode == mode else img.convert(mode)
    else:
        img = Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).convert(mode)
    params: dict[str, object] = {}
    if fmt == "JPEG":
        params = {"quality": draw(st.integers(5, 95)), "progressive": draw(st.booleans())}
    elif fmt == "WEBP":
        params = {"lossless": draw(st.booleans())}
    elif fmt == "TIFF":
        params = {"compression": draw(st.sampled_from([None, "tiff_lzw", "tiff_deflate", "packbits"]))}
    elif fmt == "GIF" and draw(st.booleans()):
        frames = [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).convert("P") for _ in range(2)]
        params = {"save_all": True, "append_images": frames}
    buf = io.BytesIO()
    img.save(buf, fmt, **params)
    return fmt, mode, buf.getvalue()


@st.composite
def mutated(draw: st.DrawFn) -> tuple[str, str, bytes]:
    fmt, mode, data = draw(encoded_images())
    buf = bytearray(data)
    for _ in range(draw(st.integers(1, 6))):
        op = draw(st.sampled_from(["flip", "byte", "truncate", "insert", "delete", "splice"]))
        if not buf:
            break
        i = draw(st.integers(0, len(buf) - 1))
        if op == "flip":
            buf[i] ^= 1 << draw(st.integers(0, 7))
        elif op == "byte":
            buf[i] = draw(st.sampled_from([0x00, 0xFF, 0x7F, 0x80, draw(st.integers(0, 255))]))
        elif op == "truncate":
            del buf[i:]
        elif op == "insert":
            buf[i:i] = draw(st.binary(min_size=1, max_size=16))
        elif op == "delete":
            del buf[i : i + draw(st.integers(1, 16))]
        else:  # a chunk of the file copied elsewhere in it
            j = draw(st.integers(0, len(buf) - 1))
            buf[j:j] = buf[i : i + draw(st.integers(1, 64))]
    return fmt, mode, bytes(buf)


@settings(FUZZ, max_examples=200)
@given(encoded_images())
def test_preprocess_of_valid_small_images_in_every_mode_decodes(image: tuple[str, str, bytes]) -> None:
    fmt, mode, data = image
    out = preprocess(data, CFG, MAX_PIXELS)
    assert out.shape == (3, 32, 32) and out.dtype == np.float32 and np.isfinite(out).all(), (fmt, mode)


def test_preprocess_of_mutated_images_is_an_array_or_image_error() -> None:
    # The outcomes are counted within this test (the examples are derandomized, so the same every run): the
    # mutations must be varied enough that some files still decode and others are refused.
    outcomes: Counter[str] = Counter()

    @settings(FUZZ, max_examples=300)
    @given(mutated(), st.booleans())
    def fuzz(image: tuple[str, str, bytes], draft: bool) -> None:
        _, _, data = image
        check_preprocess(data, outcomes, draft)

    fuzz()
    print(f"\npreprocess of mutated images: {dict(outcomes)}")
    assert outcomes["decoded"] > 0 and outcomes["invalid_image"] > 0, dict(outcomes)


# --- the HTTP API against its own OpenAPI schema -----------------------------------------------------------------

CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance]
API_EXAMPLES = 60  # per operation and generation mode


def fuzz_operation(
    operation: schemathesis.APIOperation,
    mode: schemathesis.GenerationMode,
    statuses: Counter[int],
    examples: int = API_EXAMPLES,
    **fixed: object,
) -> None:
    """Generated requests for one operation: no 5xx, and every answer as the schema documents it."""

    @settings(FUZZ, max_examples=examples)
    @given(case=operation.as_strategy(generation_mode=mode, **fixed))  # type: ignore[arg-type]
    def run_case(case: schemathesis.Case) -> None:
        response = case.call()
        statuses[response.status_code] += 1
        case.validate_response(response, checks=CHECKS)

    run_case()


def _infer_body() -> dict[str, object]:
    """An OIP request the fake model serves: two encoded images as base64 BYTES, every output as JSON."""
    blobs = [jpeg(), jpeg(size=(40, 50), color=(10, 200, 90))]
    data = [base64.b64encode(b).decode() for b in blobs]
    return {"inputs": [{"name": "image_bytes", "shape": [2, 1], "datatype": "BYTES", "data": data}]}


# Load and unload change what is served (their behaviour is tested in test_oip_http.py); here they only meet
# generated names, which name no model: 404 or 400, never a 5xx.
NEVER_200 = {"POST /v2/repository/models/{model_name}/load", "POST /v2/repository/models/{model_name}/unload"}


def test_api_conforms_to_its_openapi_schema_under_generated_requests() -> None:
    settings = Settings(model_path="unused.onnx", max_batch_size=4, max_images_per_request=4)  # type: ignore[arg-type]
    app = create_app(settings, model=ExplainableFake())  # /explain needs a feature map to reach its 200s
    served = {"model_name": settings.single_model_name(), "model_version": 1}
    schema = schemathesis.openapi.from_asgi("/openapi.json", app)
    statuses: dict[str, Counter[int]] = {}
    try:
        for result in schema.get_all_operations():
            operation = result.ok()
            label = operation.label
            statuses[label] = Counter()
            fuzz_operation(operation, schemathesis.GenerationMode.POSITIVE, statuses[label])
            try:
                fuzz_operation(operation, schemathesis.GenerationMode.NEGATIVE, statuses[label])
            except Unsatisfiable:
                assert operation.method.upper() == "GET", "only parameterless operations have no invalid inputs"
            names = {k: v for k, v in served.items() if "{" + k + "}" in operation.path}
            if names and label not in NEVER_200:
                # Generated names are never the served model's; the real one reaches the 200 answers.
                body = {"body": _infer_body(), "media_type": "application/json"} if "infer" in label else {}
                fuzz_operation(
                    operation, schemathesis.GenerationMode.POSITIVE, statuses[label], 6, path_parameters=names, **body
                )
            elif operation.method.upper() == "POST" and label.split()[1] in ("/classify", "/embed", "/explain"):
                # Generated binary strings are never images; real ones reach the 200 answers and their schemas.
                body = {"images": [jpeg(), jpeg(size=(40, 50), color=(10, 200, 90))]}
                fuzz_operation(
                    operation,
                    schemathesis.GenerationMode.POSITIVE,
                    statuses[label],
                    6,
                    body=body,
                    media_type="multipart/form-data",
                )
    finally:
        schemathesis_asgi.shutdown_lifespans()
    report = "\n  ".join(
        f"{label}: {sum(s.values())} cases, statuses {dict(sorted(s.items()))}" for label, s in statuses.items()
    )
    print(f"\nschemathesis:\n  {report}")
    assert len(statuses) == sum(len(methods) for methods in app.openapi()["paths"].values())
    assert all(200 in s for label, s in statuses.items() if label not in NEVER_200), statuses
    assert all(sum(s.values()) > 0 and not any(code >= 500 for code in s) for s in statuses.values())
