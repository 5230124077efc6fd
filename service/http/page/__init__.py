"""The try-it page at `/`: static files from this package, served by the app itself (no CDN, no build step)."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from importlib import resources

from fastapi import APIRouter, Request
from starlette.responses import Response

from ...core.errors import ServiceError

# The page's own files, served under /page/; index.html is served at /.
ASSETS = {"app.js": "text/javascript", "style.css": "text/css", "icon.svg": "image/svg+xml"}
PATHS = frozenset({"/", *(f"/page/{name}" for name in ASSETS)})
# Everything from this origin only. Previews of the images a person picks are blob: URLs the page makes
# itself (URL.createObjectURL), the one thing beyond 'self' an <img> may load.
CSP = (
    "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' blob:; connect-src 'self'; "
    "object-src 'none'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)
SECURITY_HEADERS = {
    "content-security-policy": CSP,
    "x-content-type-options": "nosniff",
    "referrer-policy": "no-referrer",
    "x-frame-options": "DENY",
}
# index.html is revalidated on every load (it is tiny, and names the assets' versions); an asset asked for
# with its current version in the query string never changes, so the browser may keep it for a year.
INDEX_CACHE = "no-cache"
VERSIONED_CACHE = "public, max-age=31536000, immutable"


@dataclass(frozen=True)
class _File:
    body: bytes
    media_type: str
    etag: str


def _load() -> tuple[_File, dict[str, _File], dict[str, str]]:
    """index.html with each asset's URL carrying its content hash, the assets, and those hashes."""
    folder = resources.files(__package__)
    assets, versions = {}, {}
    for name, media_type in ASSETS.items():
        body = (folder / name).read_bytes()
        versions[name] = hashlib.sha256(body).hexdigest()[:12]
        assets[name] = _File(body, media_type, f'"{versions[name]}"')
    html = (folder / "index.html").read_text()
    for name, version in versions.items():
        html = html.replace(f'"page/{name}"', f'"page/{name}?v={version}"')
    body = html.encode()
    index = _File(body, "text/html; charset=utf-8", f'"{hashlib.sha256(body).hexdigest()[:12]}"')
    return index, assets, versions


def _answer(request: Request, file: _File, cache: str) -> Response:
    headers = {**SECURITY_HEADERS, "cache-control": cache, "etag": file.etag}
    if file.etag in request.headers.get("if-none-match", ""):
        return Response(status_code=304, headers=headers)
    return Response(file.body, media_type=file.media_type, headers=headers)


def build_page_router() -> APIRouter:
    """GET / and GET /page/{asset}; public (the API calls the page makes carry the key), not in OpenAPI."""
    index, assets, versions = _load()
    router = APIRouter(include_in_schema=False)

    @router.get("/", name="page")
    async def page(request: Request) -> Response:
        return _answer(request, index, INDEX_CACHE)

    @router.get("/page/{name}", name="page")
    async def asset(request: Request, name: str) -> Response:
        if name not in assets:
            raise ServiceError("not_found")
        current = request.query_params.get("v") == versions[name]
        return _answer(request, assets[name], VERSIONED_CACHE if current else INDEX_CACHE)

    return router
