"""A tiny HTTP file server on 127.0.0.1 for download tests (never the internet).

It serves a dict of URL path -> bytes, honours `Range: bytes=N-` (206 + Content-Range), records every
request, and can misbehave on purpose:
  drop_once[path] = n   the next response for `path` sends the full Content-Length header but only
                        n body bytes, then closes the connection (a dropped download)
  corrupt.add(path)     serves the bytes with one byte flipped (a corrupted mirror)
  ignore_range = True   answers 200 with the whole body even when a Range is asked for
  wrong_range = True    answers a Range request with 206 but the whole body from byte 0
  head_headers[path]    a HEAD request for `path` is answered like the Hugging Face hub's `resolve`
                        URLs: a 302 carrying these headers (e.g. X-Linked-Etag); other HEADs get 404

    with FileServer({"/a.txt": b"hello"}) as srv:
        urllib.request.urlopen(srv.url + "/a.txt").read()
"""

from __future__ import annotations

import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class FileServer:
    def __init__(self, files: dict[str, bytes]):
        self.files = dict(files)
        self.drop_once: dict[str, int] = {}
        self.corrupt: set[str] = set()
        self.ignore_range = False
        self.wrong_range = False
        self.requests: list[tuple[str, str | None]] = []  # (path, Range header) of each GET
        self.head_headers: dict[str, dict[str, str]] = {}
        self.heads: list[str] = []  # paths of HEAD requests
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # keep test output clean
                pass

            def do_HEAD(self):
                path = self.path.split("?")[0]
                server.heads.append(path)
                if path not in server.head_headers:
                    self.send_response(404)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                self.send_response(302)
                for k, v in server.head_headers[path].items():
                    self.send_header(k, v)
                self.send_header("Location", path + "?cdn=1")
                self.send_header("Content-Length", "0")
                self.end_headers()

            def do_GET(self):
                path = self.path.split("?")[0]
                rng = self.headers.get("Range")
                server.requests.append((path, rng))
                if path not in server.files:
                    self.send_error(404, "Not Found")
                    return
                body = server.files[path]
                if path in server.corrupt:
                    body = bytes([body[0] ^ 0xFF]) + body[1:]
                start = 0
                if rng and not server.ignore_range:
                    start = 0 if server.wrong_range else int(rng.removeprefix("bytes=").split("-")[0])
                    if start >= len(body):
                        self.send_response(416)
                        self.send_header("Content-Range", f"bytes */{len(body)}")
                        self.send_header("Content-Length", "0")
                        self.end_headers()
                        return
                    self.send_response(206)
                    self.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
                else:
                    self.send_response(200)
                payload = body[start:]
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                drop = server.drop_once.pop(path, None)
                if drop is not None:
                    self.wfile.write(payload[:drop])
                    self.wfile.flush()
                    self.close_connection = True
                    return
                self.wfile.write(payload)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self) -> FileServer:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
