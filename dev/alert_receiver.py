"""A local webhook receiver: what `alerts.webhook_url` points at in the demo and the tests.

An HTTP server on 127.0.0.1 (a free port unless one is given) in a daemon thread that
records the JSON body of every POST and answers 200, so a run that alerts can be shown to
have alerted. Not for production: it keeps everything in memory and trusts every sender.

    with AlertReceiver() as rx:
        ...  # alerts.webhook_url: rx.url
        alert = rx.wait_for(lambda a: a.get("severity") == "warning", timeout=10)
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class AlertReceiver:
    def __init__(self, host: str = "127.0.0.1", port: int = 0, path: str = "/hook"):
        self.received: list[dict] = []
        self._changed = threading.Condition()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = self.rfile.read(int(self.headers.get("Content-Length", 0) or 0))
                try:
                    alert = json.loads(body)
                except ValueError:
                    alert = {"raw": body.decode(errors="replace")}
                if not isinstance(alert, dict):
                    alert = {"raw": alert}
                with receiver._changed:
                    receiver.received.append(alert)
                    receiver._changed.notify_all()
                self.send_response(200)
                self.send_header("Content-Length", "2")
                self.end_headers()
                self.wfile.write(b"ok")

            def log_message(self, *args):  # quiet: the caller reports what arrived
                pass

        self._server = ThreadingHTTPServer((host, port), Handler)
        self._server.daemon_threads = True
        self._thread: threading.Thread | None = None
        self.url = f"http://{host}:{self._server.server_address[1]}{path}"

    def start(self) -> AlertReceiver:
        if self._thread is None:
            self._thread = threading.Thread(target=self._server.serve_forever, name="alert-receiver", daemon=True)
            self._thread.start()
        return self

    def stop(self) -> None:
        if self._thread is not None:
            self._server.shutdown()
            self._thread = None
        self._server.server_close()

    def __enter__(self) -> AlertReceiver:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def wait_for(self, match: Callable[[dict], bool] = lambda alert: True, timeout: float = 10.0) -> dict | None:
        """The first alert received (so far or within `timeout` s) for which `match` is true, else None."""
        deadline = time.monotonic() + timeout
        with self._changed:
            while True:
                found = next((a for a in self.received if match(a)), None)
                left = deadline - time.monotonic()
                if found is not None or left <= 0:
                    return found
                self._changed.wait(left)
