"""A local HTTP server that speaks one provider's API: the base every fake provider shares."""

from __future__ import annotations

import base64
import json
import socket
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qsl, urlsplit


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def unb64url(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


@dataclass
class Received:
    method: str
    path: str
    query: dict[str, str]
    headers: dict[str, str]  # names lower-cased
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)

    def form(self) -> dict[str, str]:
        return dict(parse_qsl(self.body.decode(), keep_blank_values=True))


@dataclass
class Reply:
    status: int
    body: Any = b""  # bytes, str, or anything JSON
    headers: dict[str, str] = field(default_factory=dict)


class Rejected(Exception):
    """The provider's answer to a request it refuses; ``problem`` marks a malformed one."""

    def __init__(self, reply: Reply, problem: str | None = None) -> None:
        super().__init__(problem or reply.status)
        self.reply = reply
        self.problem = problem


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    provider: ProviderServer

    def handle_error(self, request: Any, client_address: Any) -> None:
        # A client that timed out has gone: writing the late answer fails, and that is fine.
        pass


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: _Server

    def _serve(self) -> None:
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        parts = urlsplit(self.path)
        request = Received(
            method=self.command,
            path=parts.path,
            query=dict(parse_qsl(parts.query)),
            headers={name.lower(): value for name, value in self.headers.items()},
            body=body,
        )
        reply = self.server.provider.dispatch(request)
        headers = dict(reply.headers)
        if isinstance(reply.body, bytes):
            payload = reply.body
        elif isinstance(reply.body, str):
            payload = reply.body.encode()
            headers.setdefault("Content-Type", "text/plain; charset=utf-8")
        else:
            payload = json.dumps(reply.body).encode()
            headers.setdefault("Content-Type", "application/json")
        self.send_response(reply.status)
        for name, value in headers.items():
            self.send_header(name, value)
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    do_GET = do_POST = do_PUT = do_DELETE = _serve

    def log_message(self, format: str, *args: Any) -> None:
        pass


class ProviderServer:
    """A threaded local HTTP server; subclasses implement ``handle``."""

    def __init__(self) -> None:
        self.received: list[Received] = []
        self.problems: list[str] = []
        self._failures: deque[Reply | None] = deque()
        self._delays: deque[float] = deque()
        self._lock = threading.RLock()  # handle() may take failures under it
        self._server = _Server(("127.0.0.1", 0), _Handler)
        self._server.provider = self
        # A short poll interval so stopping a fake between tests is quick.
        self._thread = threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True
        )

    @property
    def url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host!s}:{port}"

    def start(self) -> ProviderServer:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()

    def reset(self) -> None:
        with self._lock:
            self.received.clear()
            self.problems.clear()
            self._failures.clear()
            self._delays.clear()

    def fail_next(
        self, status: int, body: Any = b"", headers: dict[str, str] | None = None, times: int = 1
    ) -> None:
        """Answer the next ``times`` well-formed requests with this failure."""
        for _ in range(times):
            self._failures.append(Reply(status, body, headers or {}))

    def pass_next(self, times: int = 1) -> None:
        """Handle the next ``times`` well-formed requests normally, before any failure queued
        after this call."""
        for _ in range(times):
            self._failures.append(None)

    def delay_next(self, seconds: float) -> None:
        """Hold the next request this long before handling it (it is still handled)."""
        self._delays.append(seconds)

    def take_failure(self) -> Reply | None:
        with self._lock:
            return self._failures.popleft() if self._failures else None

    def dispatch(self, request: Received) -> Reply:
        with self._lock:
            self.received.append(request)
            delay = self._delays.popleft() if self._delays else 0.0
        if delay:
            time.sleep(delay)
        try:
            with self._lock:
                return self.handle(request)
        except Rejected as rejected:
            if rejected.problem:
                self.problems.append(f"{request.method} {request.path}: {rejected.problem}")
            return rejected.reply

    def handle(self, request: Received) -> Reply:
        raise NotImplementedError

    # Shared checks ---------------------------------------------------------------------

    @staticmethod
    def bearer(request: Received) -> str | None:
        value = request.headers.get("authorization", "")
        return value[7:] if value.startswith("Bearer ") else None


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def wait_until(condition: Callable[[], bool], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        time.sleep(0.01)
