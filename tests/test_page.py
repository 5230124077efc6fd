"""The try-it page at `/` in a real headless browser (Debian's chromium and chromedriver, driven by selenium)
against a real server: what it renders is what the API answers, errors included, by keyboard too."""

from __future__ import annotations

import io
import os
import shutil
import socket
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from PIL import Image

from tests.conftest import ROOT, jpeg, wait_until

CHROMIUM, CHROMEDRIVER = Path("/usr/bin/chromium"), Path("/usr/bin/chromedriver")
# Headless as root, and nothing that would reach out: this machine's network refuses such connections, and a
# browser retrying them slows every page load.
CHROMIUM_FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-dev-shm-usage",
    "--window-size=1280,1000",
)
PHOTOS = ("chelsea.png", "coffee.png", "rocket.jpg")
# Set to a path to save the page with results there (the README's docs/page.png comes from this test).
SCREENSHOT_ENV = "PAGE_SCREENSHOT"
WAIT_S = 60  # only stops a hang: every wait below polls for a condition


def _missing() -> str | None:
    """Why the browser test cannot run here, or None."""
    try:
        import selenium  # noqa: F401
    except ImportError:
        return "selenium is not installed (pip install -e '.[dev]')"
    for binary in (CHROMIUM, CHROMEDRIVER):
        if not binary.exists():
            return f"{binary} is missing (make browser: apt-get install chromium chromium-driver)"
    return None


@pytest.fixture(scope="module")
def browser(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    """One headless Chromium for the module, with a fresh profile; skipped where none is installed, except
    in CI (CI set), where a missing browser is a failure."""
    if (reason := _missing()) is not None:
        if os.environ.get("CI"):
            pytest.fail(f"the browser test must run in CI: {reason}")
        pytest.skip(reason)
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for flag in CHROMIUM_FLAGS:
        options.add_argument(flag)
    options.add_argument(f"--user-data-dir={tmp_path_factory.mktemp('chromium-profile')}")
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(options=options, service=Service(executable_path=str(CHROMEDRIVER)))
    try:
        yield driver
    finally:
        driver.quit()


@pytest.fixture
def photo_files(photos: list[tuple[str, bytes]], tmp_path: Path) -> list[Path]:
    """Three of the bundled photographs as files the file input can be given."""
    by_name = dict(photos)
    paths = []
    for name in PHOTOS:
        path = tmp_path / name
        path.write_bytes(by_name[name])
        paths.append(path)
    return paths


def wait_for(driver: Any, condition: Callable[[Any], Any]) -> Any:
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(driver, WAIT_S, poll_frequency=0.05).until(condition)


def runs(driver: Any) -> int:
    """How many classify runs the page has finished (it counts them on <body data-runs>)."""
    return int(driver.find_element("tag name", "body").get_attribute("data-runs") or 0)


def open_page(driver: Any, url: str) -> None:
    driver.get_log("browser")  # what earlier tests' pages logged (their expected 4xx answers) is theirs
    driver.get(f"{url}/")
    wait_for(driver, lambda d: d.find_element("tag name", "body").get_attribute("data-runs") == "0")


def upload(driver: Any, paths: list[Path]) -> None:
    """Pick files through the page's own file input and wait for the page to finish with them."""
    before = runs(driver)
    picker = driver.find_element("id", "files")
    # chromedriver adds to a `multiple` input's earlier files: start from none, as a person's pick does.
    driver.execute_script("arguments[0].value = ''", picker)
    picker.send_keys("\n".join(str(p) for p in paths))
    wait_for(driver, lambda d: runs(d) > before)


def files_for(paths: list[Path], content_type: str | None = None) -> list[tuple[str, tuple[str, bytes, str]]]:
    types = {".png": "image/png", ".jpg": "image/jpeg", ".txt": "text/plain"}
    return [("images", (p.name, p.read_bytes(), content_type or types[p.suffix])) for p in paths]


def browser_errors(driver: Any) -> list[str]:
    """Console errors (a Content-Security-Policy violation, a failed script) since the last call."""
    return [e["message"] for e in driver.get_log("browser") if e["level"] == "SEVERE"]


def test_page_shows_what_the_api_answers(server_factory, tiny_onnx: Path, browser: Any, photo_files) -> None:
    server = server_factory({"RESNEST_MODEL_PATH": str(tiny_onnx)})
    open_page(browser, server.url)
    browser.find_element("id", "top-k").clear()
    browser.find_element("id", "top-k").send_keys("3")
    upload(browser, photo_files)
    wait_for(browser, lambda d: d.find_element("id", "similarity-section").is_displayed())
    assert browser.find_element("id", "error").is_displayed() is False

    # Classes: the same labels in the same order and the same scores as /classify gives for the same files.
    expected = httpx.post(f"{server.url}/classify", params={"top_k": 3}, files=files_for(photo_files), timeout=60)
    assert expected.status_code == 200
    cards = browser.find_elements("css selector", "#results > li.result")
    assert [c.get_attribute("data-filename") for c in cards] == list(PHOTOS)
    for card, result in zip(cards, expected.json()["results"], strict=True):
        rows = card.find_elements("css selector", "li.prediction")
        want = result["predictions"]
        assert [r.find_element("class name", "label").text for r in rows] == [p["label"] for p in want]
        for row, p in zip(rows, want, strict=True):
            assert float(row.get_attribute("data-score")) == pytest.approx(p["score"], rel=1e-5)
            shown = float(row.find_element("class name", "score").text.rstrip("%"))
            assert shown == pytest.approx(p["score"] * 100, abs=0.0051)
            bar = row.find_element("class name", "bar").value_of_css_property("width")
            assert bar.endswith("px")
        assert card.find_element("tag name", "img").get_attribute("alt") == result["filename"]

    # Heatmaps: a class's toggle shows /explain's overlay for that image and class over the image, byte for byte
    # what the API gives; another class's replaces it; pressing the shown one again brings the photograph back.
    first = cards[0]
    img = first.find_element("tag name", "img")
    preview = img.get_attribute("src")
    toggles = first.find_elements("css selector", "li.prediction button.explain")
    assert len(toggles) == 3 and all(t.get_attribute("aria-pressed") == "false" for t in toggles)
    for row_index in (1, 0):
        toggles[row_index].click()
        index = first.find_elements("css selector", "li.prediction")[row_index].get_attribute("data-index")
        wait_for(browser, lambda _, index=index: img.get_attribute("data-heatmap") == index)
        assert [t.get_attribute("aria-pressed") for t in toggles] == ["true" if i == row_index else "false"
                                                                      for i in range(3)]  # fmt: skip
        # The picture as the browser decoded it: its size, and the pixels of a 32 x 32 square in its middle.
        width, height, pixels = browser.execute_script(
            "const img = arguments[0], c = document.createElement('canvas');"
            "c.width = img.naturalWidth; c.height = img.naturalHeight;"
            "const g = c.getContext('2d'); g.drawImage(img, 0, 0);"
            "const x = Math.floor(c.width / 2) - 16, y = Math.floor(c.height / 2) - 16;"
            "return [c.width, c.height, Array.from(g.getImageData(x, y, 32, 32).data)];",
            img,
        )
        want = httpx.post(f"{server.url}/explain", params={"class": index, "format": "png", "max_side": 512},
                          files=files_for(photo_files[:1]), timeout=60)  # fmt: skip
        assert want.status_code == 200
        overlay = np.asarray(Image.open(io.BytesIO(want.content)).convert("RGBA"), dtype=np.int64)
        assert (width, height) == (overlay.shape[1], overlay.shape[0])
        x, y = width // 2 - 16, height // 2 - 16
        got = np.asarray(pixels, dtype=np.int64).reshape(32, 32, 4)
        assert np.abs(got - overlay[y : y + 32, x : x + 32]).max() <= 1
        assert "where the model found" in img.get_attribute("alt")
    toggles[0].click()
    wait_for(browser, lambda _: img.get_attribute("data-heatmap") is None)
    assert img.get_attribute("src") == preview and img.get_attribute("alt") == PHOTOS[0]

    # Timings: the server's figures from the response headers, and the request id.
    timings = {
        t.get_attribute("data-timing"): t.get_attribute("data-value")
        for t in browser.find_elements("css selector", "#timings [data-timing]")
    }
    assert timings["images"] == "3"
    for name in ("preprocess", "queue", "inference", "round-trip"):
        assert float(timings[name]) >= 0, name
    assert "request" in browser.find_element("id", "timings").text

    # Similarity: cosine between the uploads, as numpy computes it from /embed?normalize=true.
    embedded = httpx.post(f"{server.url}/embed", params={"normalize": "true"}, files=files_for(photo_files), timeout=60)
    vectors = np.array([r["embedding"] for r in embedded.json()["results"]], dtype=np.float64)
    cosine = vectors @ vectors.T / np.outer(np.linalg.norm(vectors, axis=1), np.linalg.norm(vectors, axis=1))
    cells = browser.find_elements("css selector", "#similarity td[data-value]")
    assert len(cells) == len(PHOTOS) ** 2
    for cell in cells:
        i, j = int(cell.get_attribute("data-i")), int(cell.get_attribute("data-j"))
        assert float(cell.get_attribute("data-value")) == pytest.approx(cosine[i, j], abs=1e-5)
        assert float(cell.text) == pytest.approx(cosine[i, j], abs=0.00051)

    # The model card, and the random-weights warning where it applies (it does: the tiny model is seeded).
    info = httpx.get(f"{server.url}/model").json()
    wait_for(browser, lambda d: d.find_element("id", "model-card").get_attribute("data-model") == info["name"])
    card = {
        dd.get_attribute("data-field"): dd.text
        for dd in browser.find_elements("css selector", "#model-card dd[data-field]")
    }
    assert card["variant"] == info["variant"]
    assert card["classes"] == str(info["num_classes"])
    assert card["precision"] == info["precision"]
    assert card["providers"] == ", ".join(info["providers"])
    assert info["weights"]["sha256"][:16] in card["weights"]
    warning = browser.find_element("id", "warning")
    assert warning.is_displayed() and info["warning"] in warning.text
    assert warning.get_attribute("role") == "alert"
    # One model in one version: nothing to choose, so no picker (and no model parameter on the requests).
    assert info["models"] == [info["name"]] and info["versions"] == [info["version"]]
    assert not browser.find_element("id", "model-picker").is_displayed()
    assert not browser.find_element("id", "model-select").is_displayed()
    assert not browser.find_element("id", "version-select").is_displayed()
    assert card["name"] == f"{info['name']}, version {info['version']}"
    sent = browser.execute_script("return performance.getEntriesByType('resource').map(e => e.name)")
    assert not any("model=" in url for url in sent)

    # Nothing from another origin, no console error (a CSP violation would be one).
    origins = browser.execute_script("return performance.getEntriesByType('resource').map(e => new URL(e.name).origin)")
    assert set(origins) <= {server.url}
    assert browser_errors(browser) == []
    if target := os.environ.get(SCREENSHOT_ENV):
        save_screenshot(browser, Path(target))


def save_screenshot(driver: Any, target: Path) -> None:
    """The whole page as a small PNG (palette-quantised: a README image, not a photograph archive)."""
    import base64

    driver.execute_script("document.activeElement.blur()")  # no focus ring in the picture
    shot = driver.execute_cdp_cmd("Page.captureScreenshot", {"format": "png", "captureBeyondViewport": True})
    image = Image.open(io.BytesIO(base64.b64decode(shot["data"]))).convert("RGB")
    image = image.resize((image.width * 3 // 4, image.height * 3 // 4), Image.Resampling.LANCZOS)
    target.parent.mkdir(parents=True, exist_ok=True)
    image.quantize(colors=128, method=Image.Quantize.MEDIANCUT).save(target, optimize=True)


def test_page_shows_the_services_errors(server_factory, tiny_onnx: Path, browser: Any, photo_files, tmp_path) -> None:
    limit = 100_000  # chelsea.png is 240 KB: refused from its Content-Length before a byte is read
    server = server_factory({"RESNEST_MODEL_PATH": str(tiny_onnx), "RESNEST_MAX_UPLOAD_BYTES": str(limit)})
    open_page(browser, server.url)
    text = tmp_path / "notes.txt"
    text.write_text("not an image\n")
    big = photo_files[0]
    assert big.stat().st_size > limit
    for path, status, code in ((text, 415, "unsupported_media_type"), (big, 413, "payload_too_large")):
        expected = httpx.post(f"{server.url}/classify", params={"top_k": 5}, files=files_for([path]), timeout=60)
        assert expected.status_code == status
        upload(browser, [path])
        error = browser.find_element("id", "error")
        assert error.is_displayed()
        assert (error.get_attribute("data-status"), error.get_attribute("data-code")) == (str(status), code)
        assert expected.json()["error"]["message"] in error.text
        assert f"{status} {code}" in error.text
        assert error.get_attribute("role") == "alert"

    # A good image afterwards clears the error and shows its classes.
    small = tmp_path / "small.jpg"
    small.write_bytes(jpeg())
    upload(browser, [small])
    assert not browser.find_element("id", "error").is_displayed(), browser.find_element("id", "error").text
    assert browser.find_elements("css selector", "#results li.prediction")


def overloaded(url: str, image: Path) -> bool:
    return httpx.post(f"{url}/classify", files=files_for([image]), timeout=60).status_code == 429


def test_page_shows_an_overloaded_servers_429_with_its_retry_after(
    server_factory, tiny_onnx: Path, browser: Any, tmp_path
) -> None:
    server = server_factory({"RESNEST_MODEL_PATH": str(tiny_onnx), "RESNEST_MAX_CONCURRENT_REQUESTS": "1"})
    open_page(browser, server.url)
    image = tmp_path / "a.jpg"
    image.write_bytes(jpeg())
    # An upload whose body never ends holds the one slot, as a slow client would.
    holder = socket.create_connection(("127.0.0.1", server.port))
    try:
        holder.sendall(
            b"POST /classify HTTP/1.1\r\nHost: test\r\nContent-Type: multipart/form-data; boundary=b\r\n"
            b"Content-Length: 100000\r\n\r\n--b\r\n"
        )
        wait_until(lambda: overloaded(server.url, image))
        upload(browser, [image])
        error = browser.find_element("id", "error")
        assert error.is_displayed() and error.get_attribute("data-code") == "overloaded"
        assert "429 overloaded" in error.text and "Retry after 1 s" in error.text
    finally:
        holder.close()
    # The slot is free again once the holder is gone: the same page gets its answer.
    wait_until(lambda: not overloaded(server.url, image))
    before = runs(browser)
    browser.find_element("id", "run").click()
    wait_for(browser, lambda d: runs(d) > before)
    assert not browser.find_element("id", "error").is_displayed()


def test_page_works_with_an_api_key_it_keeps_in_memory_only(
    server_factory, tiny_onnx: Path, browser: Any, tmp_path
) -> None:
    key = "page-test-key"
    server = server_factory({"RESNEST_MODEL_PATH": str(tiny_onnx), "RESNEST_API_KEY": key})
    page = httpx.get(f"{server.url}/")
    assert page.status_code == 200, "the page itself is public"
    assert httpx.get(f"{server.url}/model").status_code == 401
    open_page(browser, server.url)
    wait_for(browser, lambda d: "API key" in d.find_element("id", "model-status").text)
    image = tmp_path / "a.jpg"
    image.write_bytes(jpeg())
    upload(browser, [image])
    error = browser.find_element("id", "error")
    assert error.is_displayed() and error.get_attribute("data-status") == "401"

    from selenium.webdriver.common.keys import Keys

    browser.find_element("id", "api-key").send_keys(key, Keys.TAB)  # change event: the model card reloads
    variant = httpx.get(f"{server.url}/model", headers={"authorization": f"Bearer {key}"}).json()["variant"]
    wait_for(browser, lambda d: d.find_element("css selector", '[data-field="variant"]').text == variant)
    before = runs(browser)
    browser.find_element("id", "run").click()
    wait_for(browser, lambda d: runs(d) > before)
    assert not browser.find_element("id", "error").is_displayed()
    assert browser.find_elements("css selector", "#results li.prediction")
    stored = browser.execute_script(
        "return [localStorage.length, sessionStorage.length, document.cookie, JSON.stringify(localStorage)]"
    )
    assert stored[:3] == [0, 0, ""] and key not in stored[3]


# A PNG drawn in the page, dropped on the drop zone as a DataTransfer; calls back once the drop is dispatched.
DROP_A_PNG = """
const done = arguments[arguments.length - 1];
const canvas = document.createElement("canvas");
canvas.width = 40;
canvas.height = 30;
canvas.getContext("2d").fillRect(0, 0, 20, 30);
canvas.toBlob((blob) => {
  const transfer = new DataTransfer();
  transfer.items.add(new File([blob], "dropped.png", { type: "image/png" }));
  const zone = document.getElementById("drop-zone");
  zone.dispatchEvent(new DragEvent("dragover", { dataTransfer: transfer, bubbles: true, cancelable: true }));
  zone.dispatchEvent(new DragEvent("drop", { dataTransfer: transfer, bubbles: true, cancelable: true }));
  done();
}, "image/png");
"""


def assert_labelled(driver: Any) -> None:
    """Every control has a label, and each one shown an accessible name (what a screen reader announces); a
    hidden one (the model picker of a one-model server) is outside the accessibility tree, so has none yet."""
    controls = driver.find_elements("css selector", "input, button, select, textarea")
    assert controls
    for control in controls:
        name = control.get_attribute("id")
        if control.tag_name in ("input", "select"):
            assert driver.execute_script("return arguments[0].labels.length", control) >= 1, f"#{name} has no <label>"
        if control.is_displayed():
            assert control.accessible_name.strip(), f"#{name} has no accessible name"


def test_page_is_keyboard_operable_labelled_and_served_safely(
    server_factory, tiny_onnx: Path, browser: Any, tmp_path
) -> None:
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.keys import Keys

    server = server_factory({"RESNEST_MODEL_PATH": str(tiny_onnx)})
    open_page(browser, server.url)

    assert_labelled(browser)
    assert browser.find_element("id", "files").get_attribute("aria-describedby") == "files-hint"

    # The file picker is reached with Tab, and focus is visible on it.
    browser.find_element("tag name", "body").click()
    focused: list[str] = []
    for _ in range(12):
        ActionChains(browser).send_keys(Keys.TAB).perform()
        active = browser.switch_to.active_element
        focused.append(active.get_attribute("id") or active.tag_name)
        if focused[-1] == "files":
            break
    assert focused[-1] == "files", f"Tab order never reached the file input: {focused}"
    outline = (active.value_of_css_property("outline-style"), active.value_of_css_property("outline-width"))
    assert outline[0] != "none" and outline[1] != "0px", f"no visible focus on the file input: {outline}"

    # Picked files, the run button works from the keyboard (Tab to it, Enter).
    image = tmp_path / "a.jpg"
    image.write_bytes(jpeg())
    upload(browser, [image])
    button = browser.find_element("id", "run")
    assert button.is_enabled()
    for _ in range(6):
        if browser.switch_to.active_element == button:
            break
        ActionChains(browser).send_keys(Keys.TAB).perform()
    assert browser.switch_to.active_element == button
    before = runs(browser)
    ActionChains(browser).send_keys(Keys.ENTER).perform()
    wait_for(browser, lambda d: runs(d) > before)

    # Dropping files on the zone works as picking them does (a synthetic drop: selenium cannot drag from disk).
    before = runs(browser)
    browser.execute_async_script(DROP_A_PNG)
    wait_for(browser, lambda d: runs(d) > before)
    assert browser.find_element("css selector", "#results > li.result").get_attribute("data-filename") == "dropped.png"

    # Served with a policy that allows only this origin, revalidated HTML, long-lived versioned assets.
    page = httpx.get(f"{server.url}/")
    csp = page.headers["content-security-policy"]
    assert "default-src 'self'" in csp and "script-src 'self'" in csp and "http" not in csp
    assert page.headers["cache-control"] == "no-cache" and page.headers["x-content-type-options"] == "nosniff"
    assert httpx.get(f"{server.url}/", headers={"if-none-match": page.headers["etag"]}).status_code == 304
    script = browser.find_element("css selector", "script[type=module]").get_attribute("src")
    asset = httpx.get(script)
    assert asset.status_code == 200 and asset.headers["content-type"].startswith("text/javascript")
    assert "immutable" in asset.headers["cache-control"]
    assert httpx.get(f"{server.url}/page/nothing.js").status_code == 404
    paths = set(httpx.get(f"{server.url}/openapi.json").json()["paths"])
    assert "/" not in paths and not any(p.startswith("/page") for p in paths) and "/classify" in paths
    assert browser_errors(browser) == []


def test_browser_target_installs_what_the_test_drives() -> None:
    """`make test` installs chromium and chromedriver (the Makefile's browser target) before running this."""
    makefile = (ROOT / "Makefile").read_text()
    assert "chromium chromium-driver" in makefile
    test_line = next(line for line in makefile.splitlines() if line.startswith("test:"))
    assert "browser" in test_line.split()
    assert shutil.which("chromium") or not os.environ.get("CI"), "CI must have chromium"


# ---- several models ------------------------------------------------------------------------------------

REPOSITORY_KEY = "repository-page-key"


def export_cli(out: Path, *flags: str) -> Path:
    """One export through the CLI's own entry point (`python -m export ...`), in this process."""
    from export.cli import main

    assert main(["--variant", "resnest14d", "--input-size", "32", "--skip-naive", "--output", str(out), *flags]) == 0
    return out


@pytest.fixture(scope="module")
def model_repository(tiny_onnx: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Triton's layout, three models: tiny (the 1000-class model at 64 px) in versions 1 and 2, all served;
    digits (10 generic classes at 32 px); backbone (headless at 32 px: embeddings only)."""
    root = tmp_path_factory.mktemp("repository")
    for version in (1, 2):
        (root / "tiny" / str(version)).mkdir(parents=True)
        shutil.copy(tiny_onnx, root / "tiny" / str(version) / "model.onnx")
    (root / "tiny" / "config.pbtxt").write_text('name: "tiny"\nversion_policy: { all { } }\n')
    (root / "digits" / "1").mkdir(parents=True)
    export_cli(root / "digits" / "1" / "model.onnx", "--num-classes", "10")
    (root / "backbone" / "1").mkdir(parents=True)
    export_cli(root / "backbone" / "1" / "model.onnx", "--num-classes", "0")
    return root


def keyed() -> dict[str, str]:
    return {"authorization": f"Bearer {REPOSITORY_KEY}"}


def shown_predictions(driver: Any) -> list[list[tuple[str, float]]]:
    """(label, score) of each image's rendered class bars, in page order."""
    return [
        [(r.find_element("class name", "label").text, float(r.get_attribute("data-score")))
         for r in card.find_elements("css selector", "li.prediction")]
        for card in driver.find_elements("css selector", "#results > li.result")
    ]  # fmt: skip


def assert_matches_classify(driver: Any, url: str, paths: list[Path], params: dict[str, Any]) -> list[list[str]]:
    """The page shows what POST /classify answers for the same files and parameters; returns the labels."""
    expected = httpx.post(f"{url}/classify", params=params, files=files_for(paths), headers=keyed(), timeout=60)
    assert expected.status_code == 200, expected.text
    answer = expected.json()
    section = driver.find_element("id", "results-section")
    assert (section.get_attribute("data-model"), section.get_attribute("data-version")) == (
        answer["model_name"],
        str(answer["model_version"]),
    )
    shown = shown_predictions(driver)
    assert len(shown) == len(answer["results"]) == len(paths)
    for rows, result in zip(shown, answer["results"], strict=True):
        assert [label for label, _ in rows] == [p["label"] for p in result["predictions"]]
        assert [score for _, score in rows] == pytest.approx([p["score"] for p in result["predictions"]], rel=1e-5)
    assert not driver.find_element("id", "error").is_displayed(), driver.find_element("id", "error").text
    return [[label for label, _ in rows] for rows in shown]


def card_fields(driver: Any) -> dict[str, str]:
    return {
        dd.get_attribute("data-field"): dd.text
        for dd in driver.find_elements("css selector", "#model-card dd[data-field]")
    }


def pick(driver: Any, select_id: str, value: str) -> None:
    """Choose an option of a picker and wait for the page to have run the images against that choice."""
    from selenium.webdriver.support.ui import Select

    before = runs(driver)
    Select(driver.find_element("id", select_id)).select_by_value(value)
    wait_for(
        driver, lambda d: runs(d) > before and d.find_element("tag name", "body").get_attribute("data-state") == "idle"
    )


def options(driver: Any, select_id: str) -> list[str]:
    from selenium.webdriver.support.ui import Select

    return [o.get_attribute("value") for o in Select(driver.find_element("id", select_id)).options]


def test_page_picks_among_the_served_models(
    server_factory, model_repository: Path, browser: Any, photo_files: list[Path]
) -> None:
    from selenium.webdriver.common.keys import Keys

    server = server_factory({"RESNEST_MODEL_REPOSITORY": str(model_repository), "RESNEST_API_KEY": REPOSITORY_KEY})
    url = server.url
    # Several models, none named: /model asks for one; the index (behind the key too) lists them.
    ambiguous = httpx.get(f"{url}/model", headers=keyed())
    assert (ambiguous.status_code, ambiguous.json()["error"]["code"]) == (422, "invalid_parameter")
    index = httpx.post(f"{url}/v2/repository/index", json={"ready": True}, headers=keyed()).json()
    served = sorted({row["name"] for row in index if row["state"] == "READY"})
    assert served == ["backbone", "digits", "tiny"]
    cards = {name: httpx.get(f"{url}/model", params={"model": name}, headers=keyed()).json() for name in served}

    # Without the key the page can list nothing; with it (typed, then Tab: the change event) the picker appears.
    open_page(browser, url)
    wait_for(browser, lambda d: "API key" in d.find_element("id", "model-status").text)
    assert not browser.find_element("id", "model-picker").is_displayed()
    browser.find_element("id", "api-key").send_keys(REPOSITORY_KEY, Keys.TAB)
    wait_for(browser, lambda d: d.find_element("id", "model-picker").is_displayed())
    # The console shows only the expected answers: /model's 401 without the key, its 422 with it.
    expected = {f"{url}/model - Failed to load resource: the server responded with a status of {status}"
                for status in ("401 (Unauthorized)", "422 (Unprocessable Entity)")}  # fmt: skip
    assert set(browser_errors(browser)) <= expected
    picker = browser.find_element("id", "model-select")
    assert options(browser, "model-select") == served
    assert picker.accessible_name == "Model" and picker.get_attribute("value") == served[0]
    assert browser.execute_script("return arguments[0].labels.length", picker) == 1
    assert_labelled(browser)

    # The first served model is chosen: backbone, headless. Its images get embeddings and similarity, and a
    # note instead of class bars; no error, and "Classes per image" is off.
    assert card_fields(browser)["classes"].startswith("none")
    assert not browser.find_element("id", "version-select").is_displayed(), "backbone has one version"
    assert not browser.find_element("id", "top-k").is_enabled()
    assert browser.find_element("id", "run").text == "Embed again"
    upload(browser, photo_files)
    assert not browser.find_element("id", "error").is_displayed(), browser.find_element("id", "error").text
    assert browser.find_element("id", "headless-note").is_displayed()
    assert browser.find_elements("css selector", "#results li.prediction") == []
    dims = [e.get_attribute("data-dim") for e in browser.find_elements("css selector", "#results .embedding-note")]
    assert dims == [str(cards["backbone"]["embedding_dim"])] * len(photo_files)
    embedded = httpx.post(
        f"{url}/embed",
        params={"model": "backbone", "normalize": "true"},
        files=files_for(photo_files),
        headers=keyed(),
        timeout=60,
    ).json()
    vectors = np.array([r["embedding"] for r in embedded["results"]], dtype=np.float64)
    cell = browser.find_element("css selector", '#similarity td[data-i="0"][data-j="1"]')
    assert float(cell.get_attribute("data-value")) == pytest.approx(float(vectors[0] @ vectors[1]), abs=1e-5)

    # By keyboard: the next model is one arrow key away, and picking it reruns the images against it.
    before = runs(browser)
    picker.send_keys(Keys.ARROW_DOWN)
    wait_for(
        browser,
        lambda d: runs(d) > before and d.find_element("id", "results-section").get_attribute("data-model") == "digits",
    )
    assert browser.switch_to.active_element == picker
    assert card_fields(browser)["classes"] == str(cards["digits"]["num_classes"]) == "10"
    assert browser.find_element("id", "warning").is_displayed()
    assert cards["digits"]["warning"] in browser.find_element("id", "warning").text
    assert not browser.find_element("id", "headless-note").is_displayed()
    digits_labels = assert_matches_classify(browser, url, photo_files, {"model": "digits", "top_k": 5})
    assert all(label.startswith("class_") for labels in digits_labels for label in labels)

    # Another model: its own labels, its class count; tiny has two versions, so the version picker appears.
    pick(browser, "model-select", "tiny")
    assert card_fields(browser)["classes"] == str(cards["tiny"]["num_classes"]) == "1000"
    tiny_labels = assert_matches_classify(browser, url, photo_files, {"model": "tiny", "top_k": 5})
    assert tiny_labels != digits_labels
    assert not any(label.startswith("class_") for labels in tiny_labels for label in labels)
    versions = browser.find_element("id", "version-select")
    assert versions.is_displayed() and versions.accessible_name == "Version"
    assert options(browser, "version-select") == ["1", "2"] and versions.get_attribute("value") == "2"
    assert_labelled(browser)
    assert browser.find_element("id", "model-card").get_attribute("data-version") == "2"

    # The older version: its card and its answers.
    pick(browser, "version-select", "1")
    assert browser.find_element("id", "model-card").get_attribute("data-version") == "1"
    assert card_fields(browser)["name"] == "tiny, version 1"
    assert (
        assert_matches_classify(browser, url, photo_files, {"model": "tiny", "version": 1, "top_k": 5}) == tiny_labels
    )

    # "Classes per image" follows the model's limit: 50 is fine for tiny, more than digits' 10 classes.
    top_k = browser.find_element("id", "top-k")
    assert top_k.get_attribute("max") == str(cards["tiny"]["top_k"]["max"])
    top_k.clear()
    top_k.send_keys("50")
    pick(browser, "model-select", "digits")
    assert (top_k.get_attribute("value"), top_k.get_attribute("max")) == ("10", "10")
    assert top_k.accessible_name == "Classes per image (1 to 10)"
    assert browser.find_element("id", "run").text == "Classify again"
    assert not browser.find_element("id", "version-select").is_displayed()
    labels = assert_matches_classify(browser, url, photo_files, {"model": "digits", "top_k": 10})
    assert all(len(row) == 10 for row in labels)
    assert browser_errors(browser) == []
