#!/usr/bin/env python3
"""Hello: the smallest api fraise. `/` answers the release's VERSION, `/health` its health."""

import os
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

# Resolved once: the process keeps serving the release it started from, even after
# `current` moves, which is what a restart is for.
RELEASE = Path(__file__).resolve().parent


class Handler(BaseHTTPRequestHandler):
    """Answers `/` and `/health`."""

    def do_GET(self):
        if self.path == "/health":
            # A release that ships an UNHEALTHY file fails its health check on purpose.
            broken = (RELEASE / "UNHEALTHY").exists()
            self.answer(500 if broken else 200, "unhealthy\n" if broken else "ok\n")
        elif self.path == "/":
            version = (RELEASE / "VERSION").read_text().strip()
            self.answer(200, f"hello {version} ({RELEASE.name})\n")
        else:
            self.answer(404, "not found\n")

    def answer(self, status, body):
        data = body.encode()
        self.send_response(status)
        self.send_header("Content-Type", "text/plain; charset=utf-8")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, format, *args):
        pass


def main():
    """Serve on HELLO_BIND:HELLO_PORT until stopped."""
    address = (os.environ.get("HELLO_BIND", "127.0.0.1"), int(os.environ.get("HELLO_PORT", "8000")))
    ThreadingHTTPServer.allow_reuse_address = True
    ThreadingHTTPServer(address, Handler).serve_forever()


if __name__ == "__main__":
    main()
