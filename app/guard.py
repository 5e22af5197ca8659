"""In front of Gradio: uploads held within a budget and never answered with a server path; arrival times.

ASGI middleware with no gradio import: app/demo.py puts ServerGuard in front of the page's routes, and the
sampling handler reads the arrival time it stamps (ARRIVAL).
"""

from __future__ import annotations

import json
import time
import urllib.parse
from pathlib import Path
from typing import Any, Callable

ARRIVAL = "npp.arrival"
"""The ASGI scope key under which ServerGuard stamps when a request reached the server."""


class UploadLedger:
    """The uploads Gradio has stored for us: their bytes stay within `budget`, each is deleted `ttl_s` after it
    came (nothing in this app reads an upload), and those refused are deleted at once."""

    def __init__(self, folder: Path, budget: int, ttl_s: float):
        self.folder, self.budget, self.ttl_s = folder, budget, ttl_s
        self._held: dict[Path, tuple[int, float]] = {}
        """path → (bytes, monotonic time it came)."""

    @property
    def held(self) -> int:
        return sum(size for size, _ in self._held.values())

    def prune(self) -> None:
        """Forget uploads Gradio's cache clean-up removed; delete those past their time."""
        now = time.monotonic()
        for path, (_, came) in list(self._held.items()):
            if not path.exists():
                del self._held[path]
            elif now - came > self.ttl_s:
                self.delete(path)

    def room(self) -> int:
        self.prune()
        return self.budget - self.held

    def admit(self, paths: list[Path]) -> bool:
        """Keep the new files when they fit the budget, else delete them; whether they were kept."""
        new = [p for p in dict.fromkeys(paths) if p not in self._held and self._inside(p) and p.is_file()]
        sizes = [p.stat().st_size for p in new]
        if self.held + sum(sizes) > self.budget:
            for path in new:
                self.delete(path)
            return False
        now = time.monotonic()
        self._held.update({p: (size, now) for p, size in zip(new, sizes)})
        return True

    def delete(self, path: Path) -> None:
        """Remove an upload and its folder (Gradio puts each in a folder named by its hash) when empty."""
        self._held.pop(path, None)
        if not self._inside(path):
            return
        path.unlink(missing_ok=True)
        try:
            path.parent.rmdir()
        except OSError:  # other files still in it
            pass

    def _inside(self, path: Path) -> bool:
        """Only files under Gradio's upload folder are ever deleted, whatever a reply said."""
        return path.resolve().is_relative_to(self.folder.resolve())

    def describe(self) -> str:
        return (f"this app holds at most {self.budget / 2**20:g} MB of uploads ({self.held / 2**20:.1f} MB "
                f"held now) and reads none of them: try again in {self.ttl_s / 60:g} minutes")


FILES_ALIAS = "/app-files"
"""What replies say instead of Gradio's temporary folder: the images a request draws are files there, and
Gradio names each by its absolute path (in "path" and in its /file= URL)."""
TEXT_TYPES = (b"json", b"text/", b"javascript")
"""Content types whose bodies may name the temporary folder (JSON replies, event streams, the page)."""


class ServerGuard:
    """ASGI middleware in front of Gradio's routes.

    Every request gets its arrival time in its scope (the sampling handler drops a request that waited too
    long). An upload must say its length and fit what the UploadLedger has room for; what Gradio stored
    is admitted or deleted, and the reply names each file by its base name only. Every other reply says
    FILES_ALIAS for Gradio's temporary folder, and a /file= request for the alias is served from the real
    folder: the absolute path tells a remote user how the server's disk is laid out (a GRADIO_TEMP_DIR in
    "/home/me/Secret Projects/client-acme/" would name a client).
    """

    def __init__(self, app, uploads: UploadLedger):
        self.app, self.uploads = app, uploads
        folders = {str(uploads.folder), str(uploads.folder.resolve())}
        spellings = {form for folder in folders for form in (folder, urllib.parse.quote(folder, safe="/"))}
        self._real = str(uploads.folder)
        self._spellings = [form.encode() for form in sorted(spellings, key=len, reverse=True)]

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        scope[ARRIVAL] = time.monotonic()
        if scope["method"] == "POST" and scope["path"].rstrip("/").endswith("/gradio_api/upload"):
            return await self._upload(scope, receive, send)
        self._unalias(scope)
        return await self.app(scope, receive, SendWithout(send, self._hide))

    def _unalias(self, scope) -> None:
        """/gradio_api/file=/app-files/… is the file /real/folder/…."""
        head, sep, tail = scope["path"].partition("/file=" + FILES_ALIAS + "/")
        if sep:
            scope["path"] = f"{head}/file={self._real}/{tail}"
            scope["raw_path"] = urllib.parse.quote(scope["path"], safe="/=:").encode()

    def _hide(self, body: bytes) -> bytes:
        for spelling in self._spellings:
            body = body.replace(spelling, FILES_ALIAS.encode())
        return body

    async def _upload(self, scope, receive, send) -> None:
        length = dict(scope["headers"]).get(b"content-length", b"")
        if not length.isdigit():
            return await _plain(send, 411, "upload refused: send its Content-Length")
        if int(length) > self.uploads.room():
            return await _plain(send, 413, f"upload refused: {self.uploads.describe()}")
        start, body = {}, []

        async def capture(message) -> None:
            if message["type"] == "http.response.start":
                start.update(message)
            else:
                body.append(message.get("body", b""))

        await self.app(scope, receive, capture)
        if start.get("status") != 200:
            return await _plain(send, start.get("status", 500), b"".join(body).decode("utf-8", "replace"))
        stored = [Path(p) for p in json.loads(b"".join(body))]
        if not self.uploads.admit(stored):
            return await _plain(send, 413, f"upload refused and deleted: {self.uploads.describe()}")
        return await _json(send, 200, [p.name for p in stored])


class SendWithout:
    """An ASGI `send` that passes text bodies through `hide`: whole (with their Content-Length set again)
    when the length was declared, chunk by chunk when streamed (one event-stream message a chunk)."""

    def __init__(self, send, hide: Callable[[bytes], bytes]):
        self.send, self.hide = send, hide
        self.start: dict | None = None
        self.rewrite, self.held = False, []

    async def __call__(self, message) -> None:
        if message["type"] == "http.response.start":
            headers = dict(message.get("headers", []))
            self.rewrite = any(t in headers.get(b"content-type", b"") for t in TEXT_TYPES) \
                and b"content-encoding" not in headers
            if self.rewrite and b"content-length" in headers:
                self.start = message  # sent with the body, once its new length is known
                return
            return await self.send(message)
        if message["type"] != "http.response.body" or not self.rewrite:
            return await self.send(message)
        if self.start is None:
            return await self.send({**message, "body": self.hide(message.get("body", b""))})
        self.held.append(message.get("body", b""))
        if message.get("more_body", False):
            return
        body = self.hide(b"".join(self.held))
        headers = [(k, v) for k, v in self.start.get("headers", []) if k != b"content-length"]
        await self.send({**self.start, "headers": [*headers, (b"content-length", str(len(body)).encode())]})
        await self.send({"type": "http.response.body", "body": body})


async def _plain(send, status: int, text: str) -> None:
    await _respond(send, status, text.encode(), b"text/plain; charset=utf-8")


async def _json(send, status: int, value: Any) -> None:
    await _respond(send, status, json.dumps(value).encode(), b"application/json")


async def _respond(send, status: int, body: bytes, content_type: bytes) -> None:
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", content_type), (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})
