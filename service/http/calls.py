"""An HTTP request as the request path's Call: its access record (made on arrival by RequestContextMiddleware)
and its disconnect as the sign that its client left; multipart uploads as encoded files to decode."""

from __future__ import annotations

from fastapi import Request, UploadFile

from ..core.repository.registry import ServedModel
from ..core.request.decoding import check_media_types
from ..core.request.path import Call, Outputs, run_encoded
from ..core.state import ServiceState
from .scope import record_of


async def _client_gone(request: Request) -> None:
    """Returns when the client disconnects (the body is already read, so receive() waits for that)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


def http_call(request: Request) -> Call:
    """The request as a Call: its record, and its disconnect as `gone`."""
    return Call(record_of(request.scope), gone=lambda: _client_gone(request))


async def run_uploads(
    request: Request, state: ServiceState, served: ServedModel, images: list[UploadFile], features: bool = False
) -> Outputs:
    """Multipart uploads (/classify, /embed, /explain): a declared type we do not decode is a 415 before any is
    read; `features`: the answer needs the feature map too (/explain)."""
    check_media_types([upload.content_type for upload in images])

    async def read() -> list[bytes]:
        return [await upload.read() for upload in images]

    return await run_encoded(http_call(request), state, served, read, len(images), features)
