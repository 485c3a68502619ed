"""What a client of the page's HTTP API may make the page open, serve or do.

Three guards, one job each:
- `ClientFiles`: the one way a handler opens a file a client named (an image payload's path, an uploaded .zip).
  Only regular files inside Gradio's upload folder or the data roots, opened without blocking (a FIFO or a
  device is refused, not read), read at most the upload cap + 1 bytes. Every refusal reads the same, so a caller
  cannot learn which files exist. Gradio checks a payload's path only when the payload carries `meta`, and
  handlers with `preprocess=False` see the raw payload, hence this check in our handlers.
- `FileRouteGuard`: Gradio's `/gradio_api/file=` route serves everything under the models folder and the data
  roots (dotfiles, the embedded Redis's data, .html inline). This middleware lets through only what the page
  shows or offers for download, and marks downloads as attachments.
- `page_middleware`: Starlette's TrustedHostMiddleware (DNS rebinding) and `SameOriginOnly` (another web page
  posting to, or reading from, this one) in front of Gradio's app.
"""

from __future__ import annotations

import base64
import binascii
import logging
import os
import stat
import urllib.parse
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from starlette.datastructures import Headers, MutableHeaders
from starlette.middleware import Middleware
from starlette.middleware.trustedhost import TrustedHostMiddleware
from starlette.responses import PlainTextResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from shared.export import FORMATS as EXPORT_FORMATS
from shared.settings import ENV_PREFIX, Settings
from shared.training.lr_result import JOB_ID, LR_FIND_DIR

log = logging.getLogger(__name__)

# One message for a path that is missing, outside the allowed folders, a link out of them, a folder, a FIFO or a
# device: which one it was is exactly what a prober wants to learn.
REFUSED = ("the page can only open files uploaded to it or inside its data folders — upload the file again "
           "(drop it on the page, or send it through /gradio_api/upload)")
LOOPBACK_HOSTS = ("localhost", "127.0.0.1", "[::1]")
FILE_ROUTES = ("/gradio_api/file=", "/gradio_api/file/")
# What the page shows inline: raster images. SVG is active content (scripts), so never inline.
INLINE_IMAGES = {".png": "image/png", ".jpg": "image/jpeg", ".jpeg": "image/jpeg", ".gif": "image/gif",
                 ".webp": "image/webp"}
# What the page offers for download from a run folder (Results tab).
RUN_DOWNLOADS = frozenset({"best.pt", "report.html"})
# Also the export bundles' zips the Results tab builds, `<run>/export/<run>-<format>.zip` (shared.export); nothing
# else in export/ (the unzipped bundle folders are not served). And the Train tab's range-test plots,
# `lr-find/<job>.png` (shared.training.lr_result), not their .json.


class FileRefused(ValueError):
    """A client-named file the page will not open (the message is `REFUSED` whatever the reason)."""

    def __init__(self) -> None:
        super().__init__(REFUSED)


class UploadError(ValueError):
    """An allowed upload the page cannot take: over the size cap, or a malformed data: URL."""


def upload_folder() -> Path:
    """Gradio's upload folder (GRADIO_TEMP_DIR), where uploads and the page's outputs are cached."""
    from gradio.utils import get_upload_folder

    return Path(get_upload_folder()).resolve()


def _within(path: Path, root: Path) -> bool:
    return path == root or root in path.parents


def _hidden(path: Path, root: Path) -> bool:
    """True when a part of `path` below `root` is a dotfile or dot-folder (caches, locks, Redis data)."""
    return any(part.startswith(".") for part in path.relative_to(root).parts)


@dataclass(frozen=True)
class ClientFiles:
    """Opens files that clients name, safely: see the module docstring."""

    upload_dir: Path
    data_roots: tuple[Path, ...]
    max_bytes: int

    @classmethod
    def for_settings(cls, settings: Settings) -> "ClientFiles":
        return cls(upload_folder(), tuple(Path(r).resolve() for r in settings.data_roots),
                   int(settings.max_upload_mb) * 1024 * 1024)

    def allowed(self, resolved: Path) -> bool:
        if _within(resolved, self.upload_dir):
            return True
        return any(_within(resolved, root) and not _hidden(resolved, root) for root in self.data_roots)

    def _resolve(self, path: Any) -> Path:
        if not isinstance(path, (str, os.PathLike)):
            raise FileRefused()
        try:
            text = os.fspath(path)
            if not text or "\x00" in text:
                raise FileRefused()
            resolved = Path(text).resolve()
        except (OSError, RuntimeError, ValueError, TypeError):
            raise FileRefused() from None
        if not self.allowed(resolved):
            raise FileRefused()
        return resolved

    def checked_path(self, path: Any, name: str | None = None) -> Path:
        """The resolved path of an allowed regular file within the cap (for code that opens it by name)."""
        resolved = self._resolve(path)
        self._open(resolved, name or resolved.name, read=False)
        return resolved

    def read_path(self, path: Any, name: str | None = None) -> bytes:
        """The bytes of an allowed regular file, at most the cap (FileRefused, or UploadError when too large)."""
        resolved = self._resolve(path)
        return self._open(resolved, name or resolved.name, read=True)

    def _open(self, resolved: Path, name: str, *, read: bool) -> bytes:
        # O_NONBLOCK: opening a FIFO must not wait for a writer; O_NOFOLLOW: a link swapped in after resolve()
        try:
            fd = os.open(resolved, os.O_RDONLY | os.O_NONBLOCK | os.O_NOFOLLOW | os.O_CLOEXEC)
        except OSError:
            raise FileRefused() from None
        with os.fdopen(fd, "rb") as fh:
            info = os.fstat(fd)
            if not stat.S_ISREG(info.st_mode):  # a FIFO, a device (/dev/zero), a socket, a folder
                raise FileRefused()
            self._check_size(info.st_size, name)
            if not read:
                return b""
            data = fh.read(self.max_bytes + 1)  # the file may have grown since fstat
        self._check_size(len(data), name)
        return data

    def _check_size(self, size: int, name: str) -> None:
        if size > self.max_bytes:
            raise UploadError(f"{name} is larger than {self.max_bytes / 2**20:.0f} MB, the page's limit — use a "
                               "smaller file")

    def read(self, payload: Any) -> tuple[bytes, str]:
        """(bytes, display name) of an image payload: a FileData dict (path, or a data: URL), or a path."""
        if isinstance(payload, dict):
            path, url = payload.get("path"), payload.get("url")
            name = str(payload.get("orig_name") or (Path(path).name if isinstance(path, str) and path else "image"))
            name = name[:120]  # it is only shown back in messages
            if path:
                return self.read_path(path, name), name
            if isinstance(url, str) and url.startswith("data:"):
                return self.decode_data_url(url, name), name
            raise FileRefused()
        if isinstance(payload, (str, os.PathLike)):
            name = Path(os.fspath(payload)).name
            return self.read_path(payload, name), name
        raise FileRefused()

    def decode_data_url(self, url: str, name: str) -> bytes:
        """The bytes of a `data:` URL, refusing one that is over the cap before decoding it."""
        header, sep, body = url.partition(",")
        if not sep:
            raise UploadError(f"{name}: a data: URL needs a comma before its data — send the image as a file")
        if len(body) > self.max_bytes * 4 // 3 + 4:  # base64 is 4 characters per 3 bytes
            self._check_size(len(body) * 3 // 4, name)
        try:
            data = (base64.b64decode(body, validate=False) if header.lower().endswith(";base64")
                    else urllib.parse.unquote_to_bytes(body))
        except (binascii.Error, ValueError):
            raise UploadError(f"{name}: the data: URL is not valid base64 — send the image as a file") from None
        self._check_size(len(data), name)
        return data


# --- the file route --------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Served:
    """How an allowed file goes out: inline with its image type, or as a download."""

    attachment: bool
    media_type: str | None = None


@dataclass(frozen=True)
class FilePolicy:
    """Which paths `/gradio_api/file=` may serve (everything else: 403, the same as Gradio's for a missing file)."""

    upload_dir: Path
    models_dir: Path
    data_roots: tuple[Path, ...]

    @classmethod
    def for_settings(cls, settings: Settings) -> "FilePolicy":
        return cls(upload_folder(), Path(settings.models_dir).resolve(),
                   tuple(Path(r).resolve() for r in settings.data_roots))

    def decide(self, text: str) -> Served | None:
        try:
            if not text or "\x00" in text or "://" in text:  # the page never asks the route to fetch URLs
                return None
            resolved = Path(text).resolve()
            if not stat.S_ISREG(os.stat(resolved).st_mode):  # FIFOs, devices, folders
                return None
        except (OSError, RuntimeError, ValueError):
            return None
        if _within(resolved, self.upload_dir):
            return Served(attachment=False)  # Gradio serves its own files: images inline, the rest as downloads
        if _within(resolved, self.models_dir):
            return self._run_file(resolved.relative_to(self.models_dir).parts)
        for root in self.data_roots:
            if _within(resolved, root) and not _hidden(resolved, root):
                media = INLINE_IMAGES.get(resolved.suffix.lower())
                return Served(False, media) if media else None
        return None

    @staticmethod
    def _run_file(parts: tuple[str, ...]) -> Served | None:
        """A run's figures (`<run>/eval/*.png`) and its downloads (best.pt, report.html, export zips), and the
        range-test plots (`lr-find/<job>.png`); nothing else."""
        if len(parts) < 2 or any(p.startswith(".") for p in parts):
            return None
        if parts[0] == LR_FIND_DIR:
            plot = len(parts) == 2 and parts[1].endswith(".png") and JOB_ID.fullmatch(parts[1][:-4])
            return Served(False, "image/png") if plot else None
        if len(parts) == 2 and parts[1] in RUN_DOWNLOADS:
            return Served(attachment=True)
        if len(parts) == 3 and parts[1] == "export" and parts[2] in {f"{parts[0]}-{f}.zip" for f in EXPORT_FORMATS}:
            return Served(attachment=True)
        media = INLINE_IMAGES.get(Path(parts[-1]).suffix.lower())
        if parts[1] == "eval" and media:
            return Served(False, media)
        return None


class FileRouteGuard:
    """ASGI middleware in front of Gradio's file route: refuses what `FilePolicy` does not allow, and sends what
    it allows with `nosniff` (and as an attachment where it is a download)."""

    def __init__(self, app: ASGIApp, policy: FilePolicy):
        self.app, self.policy = app, policy

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        path = scope.get("path", "") if scope["type"] == "http" else ""
        prefix = next((p for p in FILE_ROUTES if path.startswith(p)), None)
        if prefix is None:
            await self.app(scope, receive, send)
            return
        served = self.policy.decide(path[len(prefix):])
        if served is None:
            await PlainTextResponse("File not allowed.", status_code=403)(scope, receive, send)
            return

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start" and message.get("status", 200) < 300:
                headers = MutableHeaders(scope=message)
                headers["X-Content-Type-Options"] = "nosniff"
                if served.attachment:
                    filename = urllib.parse.quote(Path(path).name)
                    headers["Content-Disposition"] = f"attachment; filename*=utf-8''{filename}"
                    headers["Content-Type"] = "application/octet-stream"
                elif served.media_type:
                    headers["Content-Disposition"] = "inline"
                    headers["Content-Type"] = served.media_type
            await send(message)

        await self.app(scope, receive, send_with_headers)


# --- hosts and origins -----------------------------------------------------------------------------------------

def _host_port(netloc: str, scheme: str) -> tuple[str, int] | None:
    try:
        parts = urllib.parse.urlsplit(f"{scheme}://{netloc}")
        port = parts.port or {"http": 80, "https": 443, "ws": 80, "wss": 443}.get(scheme)
    except ValueError:
        return None
    return (parts.hostname or "", port) if parts.hostname else None


def host_matches(host: str, patterns: tuple[str, ...]) -> bool:
    """TrustedHostMiddleware's rule: an exact name, or `*.example.com` for its sub-domains."""
    host = host.lower()
    return any(host == p or (p.startswith("*.") and host.endswith(p[1:])) for p in patterns)


class SameOriginOnly:
    """Refuses a browser request sent by another web page (its `Origin` is not this page's): a hostile page the
    user visits could otherwise upload files, queue or delete runs, or read answers through Gradio's CORS rules,
    which let any localhost origin in. Requests without `Origin` (navigation, API clients) pass."""

    def __init__(self, app: ASGIApp, extra_hosts: tuple[str, ...] = ()):
        self.app, self.extra_hosts = app, tuple(h.lower() for h in extra_hosts)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] in ("http", "websocket"):
            headers = Headers(scope=scope)
            origin = headers.get("origin")
            if origin is not None and not self._same(origin, headers.get("host", ""), scope):
                log.warning("refused a %s %s from origin %r", scope.get("method", "websocket"), scope.get("path"),
                            origin[:200])
                await PlainTextResponse("Cross-origin request refused: open the page itself to use it.",
                                        status_code=403)(scope, receive, send)
                return
        await self.app(scope, receive, send)

    def _same(self, origin: str, host: str, scope: Scope) -> bool:
        parts = urllib.parse.urlsplit(origin)
        if parts.scheme not in ("http", "https") or not parts.netloc:
            return False  # "null" (sandboxed frames, file://) and anything odd
        theirs = _host_port(parts.netloc, parts.scheme)
        scheme = "https" if scope.get("scheme") in ("https", "wss") else "http"
        if theirs is not None and theirs == _host_port(host, scheme):
            return True
        return theirs is not None and host_matches(theirs[0], self.extra_hosts)


def trusted_hosts(settings: Settings) -> list[str]:
    """Host names the page answers: loopback only without a login; with one, any unless an allow-list is set."""
    if settings.auth and not settings.allowed_hosts:
        return ["*"]
    hosts = list(LOOPBACK_HOSTS) + list(settings.allowed_hosts)
    bound = settings.host if ":" not in settings.host else f"[{settings.host}]"
    if settings.host not in ("0.0.0.0", "::", "") and bound.lower() not in hosts:
        hosts.append(bound.lower())
    return hosts


def check_allowed_hosts(settings: Settings) -> None:
    """ValueError (saying what to set) for an allow-list without a login or with malformed names."""
    if settings.allowed_hosts and not settings.auth:
        raise ValueError(f"{ENV_PREFIX}ALLOWED_HOSTS needs {ENV_PREFIX}AUTH=user:password: without a login the "
                         "page answers only loopback names (localhost, 127.0.0.1), so that other web sites cannot "
                         "reach it through DNS rebinding")
    for pattern in settings.allowed_hosts:
        if "*" in pattern[1:] or (pattern.startswith("*") and not pattern.startswith("*.")) or "/" in pattern:
            raise ValueError(f"{ENV_PREFIX}ALLOWED_HOSTS: {pattern!r} is not a host name — list names like "
                             "lab.example.com or *.example.com, separated by commas")


def origin_middleware(settings: Settings) -> list[Middleware]:
    """The Host check (DNS rebinding), then the Origin check (other web pages)."""
    extra = tuple(settings.allowed_hosts) if settings.auth else ()
    return [Middleware(TrustedHostMiddleware, allowed_hosts=trusted_hosts(settings), www_redirect=False),
            Middleware(SameOriginOnly, extra_hosts=extra)]


def page_middleware(settings: Settings) -> list[Middleware]:
    """Outermost first: the Host check, the Origin check, then the file route's."""
    return origin_middleware(settings) + [Middleware(FileRouteGuard, policy=FilePolicy.for_settings(settings))]
