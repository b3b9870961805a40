"""An HTTP relay in front of the local S3 server that answers some requests as a throttled or a refusing S3 would:
503 SlowDown on every `every`-th request, or 403 AccessDenied on all of them while `deny` is set. The rest are
forwarded unchanged, so the client's retries and error handling run against real responses."""

from __future__ import annotations

import http.client
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlsplit

from rain_dev.s3server import free_port

_ERROR = ('<?xml version="1.0" encoding="UTF-8"?><Error><Code>{code}</Code><Message>{message}</Message>'
          '<RequestId>relay</RequestId></Error>')


class ThrottlingRelay:
    """Context manager: a relay on 127.0.0.1 to `upstream`; counts requests, throttled and denied answers."""

    def __init__(self, upstream: str, every: int = 0):
        self.upstream = urlsplit(upstream)
        self.every, self.deny = every, False
        self.requests = self.throttled = 0
        self._lock = threading.Lock()
        self.url = f"http://127.0.0.1:{free_port()}"
        self._server = ThreadingHTTPServer(("127.0.0.1", urlsplit(self.url).port), self._handler())

    def _answer(self) -> tuple[int, str, str] | None:
        """(status, code, message) to answer instead of forwarding, or None."""
        with self._lock:
            self.requests += 1
            if self.deny:
                return 403, "AccessDenied", "Access Denied"
            if self.every and self.requests % self.every == 0:
                self.throttled += 1
                return 503, "SlowDown", "Please reduce your request rate."
        return None

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        relay = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args) -> None:  # quiet
                pass

            def _relay(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                answer = relay._answer()
                if answer is not None:
                    status, code, message = answer
                    payload = _ERROR.format(code=code, message=message).encode()
                    self.send_response(status)
                    self.send_header("Content-Type", "application/xml")
                    self.send_header("Content-Length", str(len(payload)))
                    self.end_headers()
                    self.wfile.write(payload)
                    return
                conn = http.client.HTTPConnection(relay.upstream.hostname, relay.upstream.port, timeout=60)
                headers = {k: v for k, v in self.headers.items() if k.lower() != "host"}
                headers["Host"] = relay.upstream.netloc
                conn.request(self.command, self.path, body=body, headers=headers)
                response = conn.getresponse()
                data = response.read()
                self.send_response(response.status)
                for k, v in response.getheaders():
                    if k.lower() not in ("transfer-encoding", "content-length", "connection"):
                        self.send_header(k, v)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(data)
                conn.close()

            do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _relay

        return Handler

    def __enter__(self) -> ThrottlingRelay:
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc) -> None:
        self._server.shutdown()
        self._server.server_close()
