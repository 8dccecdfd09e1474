"""An HTTP proxy on 127.0.0.1 in front of the S3 test server that injects faults.

``FaultProxy(upstream).fail_next(n, kind)`` makes the next ``n`` requests (optionally only
those whose path matches ``match``) fail with ``kind``: ``"503"`` answers Service
Unavailable, ``"drop"`` closes the connection without an answer, ``"lost"`` forwards the
request (it lands upstream) and then closes the connection without passing the answer
on. ``block(match)`` fails every matching request until ``unblock()``. Every request is counted.
"""

from __future__ import annotations

import http.client
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlparse


class FaultProxy:
    def __init__(self, upstream: str) -> None:
        target = urlparse(upstream)
        self.upstream_host, self.upstream_port = target.hostname, target.port
        self._lock = threading.Lock()
        self._budget: list[tuple[str, str | None, str | None]] = []  # (kind, path part, method)
        self._blocked: str | None = None
        self.requests = 0
        self.faults = 0
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):  # quiet
                pass

            def _handle(self):
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else None
                fault = proxy._take_fault(self.command, self.path)
                if fault == "drop":
                    self.close_connection = True
                    self.connection.close()
                    return
                if fault == "503":
                    payload = b"<Error><Code>SlowDown</Code></Error>"
                    self.send_response(503)
                    self.send_header("Content-Length", str(len(payload)))
                    self.end_headers()
                    self.wfile.write(payload)
                    return
                conn = http.client.HTTPConnection(proxy.upstream_host, proxy.upstream_port,
                                                  timeout=60)
                headers = dict(self.headers.items())
                conn.request(self.command, self.path, body=body, headers=headers)
                response = conn.getresponse()
                data = response.read()
                if fault == "lost":  # done upstream, but the client never hears of it
                    conn.close()
                    self.close_connection = True
                    self.connection.close()
                    return
                self.send_response(response.status)
                for key, value in response.getheaders():
                    if key.lower() not in ("transfer-encoding", "content-length", "connection"):
                        self.send_header(key, value)
                length = response.getheader("Content-Length") if self.command == "HEAD" \
                    else str(len(data))  # HEAD carries the object's size, not a body
                self.send_header("Content-Length", length or "0")
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(data)
                conn.close()

            do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _handle

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.endpoint = f"http://127.0.0.1:{self.server.server_address[1]}"
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self._thread.start()

    def _take_fault(self, method: str, path: str) -> str | None:
        with self._lock:
            self.requests += 1
            if self._blocked is not None and self._blocked in path:
                self.faults += 1
                return "503"
            for i, (kind, match, only) in enumerate(self._budget):
                if (match is None or match in path) and only in (None, method):
                    del self._budget[i]
                    self.faults += 1
                    return kind
        return None

    def fail_next(self, n: int, kind: str = "503", match: str | None = None,
                  method: str | None = None) -> None:
        with self._lock:
            self._budget += [(kind, match, method)] * n

    def block(self, match: str) -> None:
        with self._lock:
            self._blocked = match

    def unblock(self) -> None:
        with self._lock:
            self._blocked = None

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()
