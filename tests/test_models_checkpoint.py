"""Checkpoint loading: file formats, SHA-256 checks, strict key/shape errors, URL download and cache, seeding."""

from __future__ import annotations

import hashlib
import http.client
import http.server
import json
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch

import models
from models.init import pink_noise

StateDict = dict[str, torch.Tensor]
NAME = "resnest14d"
SIZE = 64  # outputs are compared at a small size: equality does not depend on it


def sha256_of(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def save_official_style(state: StateDict | dict[str, object], directory: Path, stem: str = NAME) -> Path:
    """torch.save `state`, then name the file like an official one: `<stem>-<first 8 hex of its sha256>.pth`."""
    directory.mkdir(parents=True, exist_ok=True)
    raw = directory / f"{stem}.tmp"
    torch.save(state, raw)
    return raw.rename(directory / f"{stem}-{sha256_of(raw)[:8]}.pth")


def write_safetensors(state: StateDict, path: Path) -> None:
    """The safetensors format by hand: u64-LE header length, JSON header, then the raw little-endian bytes."""
    dtypes = {torch.float32: ("F32", "<f4"), torch.int64: ("I64", "<i8")}
    header: dict[str, object] = {"__metadata__": {"format": "pt"}}
    blobs: list[bytes] = []
    offset = 0
    for key, tensor in state.items():
        tag, numpy_dtype = dtypes[tensor.dtype]
        blob = tensor.detach().cpu().contiguous().numpy().astype(numpy_dtype).tobytes()
        header[key] = {"dtype": tag, "shape": list(tensor.shape), "data_offsets": [offset, offset + len(blob)]}
        blobs.append(blob)
        offset += len(blob)
    encoded = json.dumps(header).encode()
    encoded += b" " * (-len(encoded) % 8)  # the spec pads the header to an 8-byte boundary
    path.write_bytes(len(encoded).to_bytes(8, "little") + encoded + b"".join(blobs))


def assert_same_weights(a: torch.nn.Module, b: torch.nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    different = [k for k in sa if not torch.equal(sa[k], sb[k])]
    assert not different, f"{len(different)} tensors differ, e.g. {different[:3]}"


@pytest.fixture(scope="module")
def source() -> models.ResNeSt:
    return models.create_model(NAME, seed=1)


@pytest.fixture(scope="module")
def x() -> torch.Tensor:
    return torch.randn(2, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def reference(source: models.ResNeSt, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return source(x)


@pytest.fixture
def state(source: models.ResNeSt) -> StateDict:
    return {k: v.clone() for k, v in source.state_dict().items()}


@pytest.fixture(scope="module")
def official_file(source: models.ResNeSt, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_official_style(source.state_dict(), tmp_path_factory.mktemp("official"))


def assert_matches_reference(model: models.ResNeSt, x: torch.Tensor, reference: torch.Tensor) -> None:
    assert not model.training
    with torch.no_grad():
        assert torch.equal(model(x), reference)


# --- local files -------------------------------------------------------------------------------------------------


def test_create_model_from_official_named_file(
    official_file: Path, source: models.ResNeSt, x: torch.Tensor, reference: torch.Tensor
) -> None:
    model = models.create_model(NAME, checkpoint=official_file)
    assert_same_weights(model, source)
    assert_matches_reference(model, x, reference)
    assert model.checkpoint.sha256 == sha256_of(official_file)
    assert model.checkpoint.path == str(official_file)


def test_load_checkpoint_from_official_named_file(
    official_file: Path, source: models.ResNeSt, x: torch.Tensor, reference: torch.Tensor
) -> None:
    model = models.ResNeSt(models.VARIANTS[NAME])
    info = models.load_checkpoint(model, official_file)
    assert isinstance(info, models.CheckpointInfo)
    assert info.sha256 == sha256_of(official_file)
    assert_same_weights(model, source)
    assert_matches_reference(model.eval(), x, reference)


def _wrap_state_dict(sd: StateDict) -> object:
    return {"state_dict": sd, "epoch": 90}


def _wrap_model(sd: StateDict) -> object:
    return {"model": sd}


def _module_prefix(sd: StateDict) -> object:
    return {f"module.{k}": v for k, v in sd.items()}


def _wrapped_and_prefixed(sd: StateDict) -> object:
    return {"state_dict": _module_prefix(sd)}


def _no_num_batches_tracked(sd: StateDict) -> object:
    trimmed = {k: v for k, v in sd.items() if not k.endswith("num_batches_tracked")}
    assert len(trimmed) < len(sd)
    return trimmed


@pytest.mark.parametrize(
    "transform",
    [_wrap_state_dict, _wrap_model, _module_prefix, _wrapped_and_prefixed, _no_num_batches_tracked],
    ids=["state_dict-wrapper", "model-wrapper", "module-prefix", "wrapper+prefix", "no-num_batches_tracked"],
)
def test_wrapped_and_prefixed_forms_load(
    transform: Callable[[StateDict], object],
    state: StateDict,
    tmp_path: Path,
    x: torch.Tensor,
    reference: torch.Tensor,
) -> None:
    path = save_official_style(transform(state), tmp_path)
    assert_matches_reference(models.create_model(NAME, checkpoint=path), x, reference)


def test_safetensors_written_by_hand_loads(
    state: StateDict, source: models.ResNeSt, tmp_path: Path, x: torch.Tensor, reference: torch.Tensor
) -> None:
    path = tmp_path / f"{NAME}.safetensors"
    write_safetensors(state, path)
    model = models.create_model(NAME, checkpoint=path)
    assert_same_weights(model, source)
    assert_matches_reference(model, x, reference)


def test_missing_file_raises(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        models.create_model(NAME, checkpoint=tmp_path / "nope.pth")


# --- digests -------------------------------------------------------------------------------------------------------


def test_wrong_hash_prefix_in_file_name_raises(official_file: Path, tmp_path: Path) -> None:
    digest = sha256_of(official_file)
    wrong = "0" * 8 if not digest.startswith("0" * 8) else "1" * 8
    path = tmp_path / f"{NAME}-{wrong}.pth"
    path.write_bytes(official_file.read_bytes())
    with pytest.raises(models.ChecksumError, match=wrong):
        models.create_model(NAME, checkpoint=path)


@pytest.mark.parametrize("prefix", ["", "sha256:"])
def test_correct_full_sha256_passes(official_file: Path, prefix: str, x: torch.Tensor, reference: torch.Tensor) -> None:
    digest = sha256_of(official_file)
    model = models.create_model(NAME, checkpoint=official_file, sha256=prefix + digest.upper())
    assert model.checkpoint.sha256 == digest
    assert_matches_reference(model, x, reference)


def test_wrong_full_sha256_raises(official_file: Path) -> None:
    wrong = hashlib.sha256(b"something else").hexdigest()
    with pytest.raises(models.ChecksumError):
        models.create_model(NAME, checkpoint=official_file, sha256=wrong)


@pytest.mark.parametrize("bad", ["abc", "g" * 64, "0" * 63, "0" * 65, "528c19ca"])
def test_malformed_sha256_raises_value_error(official_file: Path, bad: str) -> None:
    with pytest.raises(ValueError, match="sha256") as excinfo:
        models.create_model(NAME, checkpoint=official_file, sha256=bad)
    assert not isinstance(excinfo.value, models.ChecksumError)


# --- strict key and shape checks -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("into", "weights", "kind"),
    [("resnest14d", "resnest26d", "unexpected keys"), ("resnest26d", "resnest14d", "missing keys")],
)
def test_other_variants_weights_are_refused_with_a_suggestion(
    into: str, weights: str, kind: str, tmp_path: Path
) -> None:
    path = save_official_style(models.create_model(weights).state_dict(), tmp_path, weights)
    with pytest.raises(models.CheckpointMismatch) as excinfo:
        models.create_model(into, checkpoint=path)
    message = str(excinfo.value)
    assert kind in message
    assert "layer1.1." in message  # 26d has a second block per stage, 14d does not
    assert f"fit: {weights}" in message
    assert "shape mismatches" not in message


def test_wrong_shape_is_named(state: StateDict, tmp_path: Path) -> None:
    state["layer2.0.conv2.fc1.weight"] = torch.zeros(7, 128, 1, 1)
    path = save_official_style(state, tmp_path)
    with pytest.raises(models.CheckpointMismatch, match=r"layer2\.0\.conv2\.fc1\.weight") as excinfo:
        models.create_model(NAME, checkpoint=path)
    assert "shape mismatches" in str(excinfo.value)
    assert "missing keys" not in str(excinfo.value)


def test_unexpected_key_is_named(state: StateDict, tmp_path: Path) -> None:
    state["head.extra.weight"] = torch.zeros(3)
    path = save_official_style(state, tmp_path)
    with pytest.raises(models.CheckpointMismatch, match=r"unexpected keys: head\.extra\.weight"):
        models.create_model(NAME, checkpoint=path)


def test_missing_key_is_named(state: StateDict, tmp_path: Path) -> None:
    del state["layer4.0.conv2.fc2.bias"]
    path = save_official_style(state, tmp_path)
    with pytest.raises(models.CheckpointMismatch, match=r"missing keys: layer4\.0\.conv2\.fc2\.bias"):
        models.create_model(NAME, checkpoint=path)


def test_non_state_dict_is_refused(tmp_path: Path) -> None:
    path = save_official_style({"epoch": 3, "lr": [0.1]}, tmp_path)
    with pytest.raises(models.CheckpointMismatch):
        models.create_model(NAME, checkpoint=path)


# --- downloads from a local HTTP server ------------------------------------------------------------------------------


@dataclass
class Server:
    """A local HTTP server: `files` maps URL paths to bytes; `truncate` paths get half their bytes."""

    base: str
    files: dict[str, bytes] = field(default_factory=dict)
    truncate: set[str] = field(default_factory=set)
    gets: list[str] = field(default_factory=list)

    def url(self, name: str) -> str:
        return f"{self.base}/{name}"


@pytest.fixture
def server() -> Iterator[Server]:
    state = Server(base="")
    lock = threading.Lock()

    class Handler(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.0"  # one request per connection, closed after the response

        def do_GET(self) -> None:
            name = self.path.lstrip("/")
            with lock:
                state.gets.append(name)
            body = state.files.get(name)
            if body is None:
                self.send_error(404)
                return
            self.send_response(200)
            self.send_header("Content-Type", "application/octet-stream")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            if name in state.truncate:
                self.wfile.write(body[: len(body) // 2])
                self.wfile.flush()
                self.close_connection = True
                return
            self.wfile.write(body)

        def log_message(self, format: str, *args: object) -> None:
            pass

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    httpd.daemon_threads = True
    httpd.timeout = 5
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    state.base = f"http://127.0.0.1:{httpd.server_address[1]}"
    try:
        yield state
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join(timeout=5)
        assert not thread.is_alive()


@pytest.fixture
def cache(tmp_path: Path) -> Path:
    return tmp_path / "cache"


def cache_contents(cache: Path) -> list[str]:
    """Names of the files in the cache (each URL has its own sub-folder)."""
    return sorted(p.name for p in cache.rglob("*") if p.is_file()) if cache.exists() else []


def cached_path(cache: Path, name: str) -> Path:
    (path,) = [p for p in cache.rglob(name) if p.is_file()]
    return path


def test_download_caches_and_shows_progress(
    server: Server,
    cache: Path,
    official_file: Path,
    x: torch.Tensor,
    reference: torch.Tensor,
    capsys: pytest.CaptureFixture[str],
) -> None:
    server.files[official_file.name] = official_file.read_bytes()
    url = server.url(official_file.name)

    first = models.ResNeSt(models.VARIANTS[NAME])
    info = models.load_checkpoint(first, url, cache_dir=cache)
    err = capsys.readouterr().err
    assert f"downloading {official_file.name}" in err
    assert "100%" in err
    assert cache_contents(cache) == [official_file.name]
    assert Path(info.path) == cached_path(cache, official_file.name)
    assert info.sha256 == sha256_of(official_file)
    assert info.source == url
    assert_matches_reference(first.eval(), x, reference)

    second = models.ResNeSt(models.VARIANTS[NAME])
    models.load_checkpoint(second, url, cache_dir=cache)
    assert "downloading" not in capsys.readouterr().err
    assert server.gets == [official_file.name]  # the second load came from the cache
    assert_matches_reference(second.eval(), x, reference)


def test_create_model_downloads_into_resnest_cache(
    server: Server,
    cache: Path,
    official_file: Path,
    x: torch.Tensor,
    reference: torch.Tensor,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.setenv("RESNEST_CACHE", str(cache))
    server.files[official_file.name] = official_file.read_bytes()
    url = server.url(official_file.name)
    for _ in range(2):
        assert_matches_reference(models.create_model(NAME, checkpoint=url, progress=False), x, reference)
    assert capsys.readouterr().err == ""  # progress=False is quiet
    assert cache_contents(cache) == [official_file.name]
    assert server.gets == [official_file.name]


def test_wrong_hash_prefix_in_url_leaves_nothing_in_cache(server: Server, cache: Path, official_file: Path) -> None:
    digest = sha256_of(official_file)
    name = f"{NAME}-{'0' * 8 if not digest.startswith('0' * 8) else '1' * 8}.pth"
    server.files[name] = official_file.read_bytes()
    with pytest.raises(models.ChecksumError):
        models.load_checkpoint(models.ResNeSt(models.VARIANTS[NAME]), server.url(name), cache_dir=cache, progress=False)
    assert server.gets == [name]
    assert cache_contents(cache) == []


def test_wrong_sha256_argument_leaves_nothing_in_cache(server: Server, cache: Path, official_file: Path) -> None:
    server.files["weights.pth"] = official_file.read_bytes()
    wrong = hashlib.sha256(b"not these weights").hexdigest()
    with pytest.raises(models.ChecksumError):
        models.load_checkpoint(
            models.ResNeSt(models.VARIANTS[NAME]), server.url("weights.pth"), sha256=wrong, cache_dir=cache
        )
    assert server.gets == ["weights.pth"]
    assert cache_contents(cache) == []


def test_truncated_download_raises_and_leaves_nothing_in_cache(
    server: Server, cache: Path, official_file: Path
) -> None:
    server.files[official_file.name] = official_file.read_bytes()
    server.truncate.add(official_file.name)
    with pytest.raises((OSError, http.client.HTTPException), match=r"truncated|IncompleteRead"):
        models.load_checkpoint(
            models.ResNeSt(models.VARIANTS[NAME]), server.url(official_file.name), cache_dir=cache, progress=False
        )
    assert server.gets == [official_file.name]
    assert cache_contents(cache) == []


def test_http_error_leaves_nothing_in_cache(server: Server, cache: Path) -> None:
    with pytest.raises(OSError, match="404"):
        models.load_checkpoint(
            models.ResNeSt(models.VARIANTS[NAME]), server.url("resnest14d-12345678.pth"), cache_dir=cache
        )
    assert cache_contents(cache) == []


@pytest.mark.parametrize("use_sha256_argument", [False, True], ids=["digest-from-name", "sha256-argument"])
def test_tampered_cache_file_is_downloaded_again(
    use_sha256_argument: bool,
    server: Server,
    cache: Path,
    official_file: Path,
    x: torch.Tensor,
    reference: torch.Tensor,
) -> None:
    good = official_file.read_bytes()
    name = "weights.pth" if use_sha256_argument else official_file.name
    sha256 = hashlib.sha256(good).hexdigest() if use_sha256_argument else None
    server.files[name] = good
    url = server.url(name)
    models.load_checkpoint(models.ResNeSt(models.VARIANTS[NAME]), url, sha256=sha256, cache_dir=cache, progress=False)
    cached = cached_path(cache, name)
    tampered = bytearray(good)
    tampered[len(tampered) // 2] ^= 0xFF
    cached.write_bytes(bytes(tampered))

    model = models.ResNeSt(models.VARIANTS[NAME])
    info = models.load_checkpoint(model, url, sha256=sha256, cache_dir=cache, progress=False)
    assert server.gets == [name, name]  # the tampered copy was refused and fetched again
    assert cached.read_bytes() == good
    assert info.sha256 == hashlib.sha256(good).hexdigest()
    assert cache_contents(cache) == [name]
    assert_matches_reference(model.eval(), x, reference)


def test_same_file_name_at_two_urls_gets_two_cache_entries(
    server: Server, cache: Path, official_file: Path, state: StateDict, tmp_path: Path
) -> None:
    other = models.create_model(NAME, seed=7).state_dict()
    other_path = tmp_path / "other.pth"
    torch.save(other, other_path)
    server.files["a/weights.pth"] = official_file.read_bytes()
    server.files["b/weights.pth"] = other_path.read_bytes()
    first, second = models.ResNeSt(models.VARIANTS[NAME]), models.ResNeSt(models.VARIANTS[NAME])
    models.load_checkpoint(first, server.url("a/weights.pth"), cache_dir=cache, progress=False)
    models.load_checkpoint(second, server.url("b/weights.pth"), cache_dir=cache, progress=False)
    assert cache_contents(cache) == ["weights.pth", "weights.pth"]
    assert torch.equal(second.state_dict()["fc.weight"], other["fc.weight"])
    assert not torch.equal(first.state_dict()["fc.weight"], other["fc.weight"])


def test_seed_and_checkpoint_together_are_refused(official_file: Path) -> None:
    with pytest.raises(ValueError, match="not both"):
        models.create_model(NAME, checkpoint=official_file, seed=0)
    with pytest.raises(ValueError, match="checkpoint too"):
        models.create_model(NAME, sha256="0" * 64)


# --- create_model without a checkpoint -------------------------------------------------------------------------------


def test_create_model_without_weights_is_in_eval_mode() -> None:
    model = models.create_model(NAME)
    assert not any(m.training for m in model.modules())
    assert not hasattr(model, "checkpoint")


def test_seeded_weights_are_reproducible_and_seed_dependent() -> None:
    a, b, c = (models.create_model(NAME, seed=s) for s in (0, 0, 1))
    assert not any(m.training for m in a.modules())
    assert_same_weights(a, b)
    sa, sc = a.state_dict(), c.state_dict()
    differing = [k for k in sa if sa[k].is_floating_point() and not torch.equal(sa[k], sc[k])]
    floating = [k for k in sa if sa[k].is_floating_point()]
    assert differing == floating  # every parameter and statistic depends on the seed


def test_random_weights_respond_to_the_input() -> None:
    model = models.create_model(NAME, seed=0)
    gen = torch.Generator().manual_seed(42)
    pink = pink_noise(gen, 2, 224)
    white = torch.randn(2, 3, 224, 224, generator=gen)
    with torch.no_grad():
        for batch in (pink, white):
            logits = model(batch)
            scale = logits.abs().max().item()
            assert scale > 0
            assert (logits[0] - logits[1]).abs().max().item() > 0.01 * scale
