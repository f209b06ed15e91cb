"""A model hub on 127.0.0.1 for tests: files in the hub's URL layout, reached through HF_ENDPOINT.

What `huggingface_hub` 2.4 asks and what it gets here, as from the real hub:

* `HEAD {endpoint}/{repo}/resolve/{revision}/{filename}`: for a small ("git") file, 200 with
  `ETag` (the git blob sha1), `X-Repo-Commit` and `Content-Length`; for a large ("LFS") file,
  302 to another host (`localhost` instead of `127.0.0.1`, as the hub sends LFS files to its
  CDN) with `X-Linked-Etag` (the sha256), `X-Linked-Size` and `X-Repo-Commit`.
* `GET` on either address: the bytes, honouring `Range: bytes=N-` with 206 and `Content-Range`.
* 404 with `X-Error-Code: EntryNotFound` for files it does not have.

Faults for tests: `cut_once[key] = n` sends the full `Content-Length` but closes the
connection after `n` bytes, once (a broken transfer); `slow[key] = seconds` spreads one
file's transfer over that long (to watch a fetch in progress); `corrupt` holds files
whose GET sends other bytes than the HEAD describes; `hold[key]` (an Event) stops a transfer
halfway until the test sets it; `requests` records every
request (method, path, Range header).
"""

from __future__ import annotations

import hashlib
import re
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

COMMIT = "0123456789abcdef0123456789abcdef01234567"
LFS_ABOVE = 1024  # files larger than this are served like LFS files


def git_sha1(data: bytes) -> str:
    return hashlib.sha1(f"blob {len(data)}\0".encode() + data).hexdigest()


class HubStandIn:
    def __init__(self) -> None:
        self.files: dict[str, bytes] = {}  # "repo/filename" -> bytes
        self.cut_once: dict[str, int] = {}  # "repo/filename" -> bytes sent before the connection drops
        self.hold: dict[str, threading.Event] = {}  # keys whose GET sends half, then waits for the event
        self.corrupt: set[str] = set()  # keys whose GET sends other bytes of the same size
        self.slow: dict[str, float] = {}  # "repo/filename" -> seconds one transfer takes
        self.requests: list[tuple[str, str, str | None]] = []  # (method, path, Range header)
        self._lock = threading.Lock()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self._server.daemon_threads = True
        self.port = self._server.server_address[1]
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    def add(self, repo: str, filename: str, data: bytes) -> None:
        self.files[f"{repo}/{filename}"] = data

    def add_tree(self, repo: str, folder: Path, names: list[str], prefix: str = "") -> None:
        for name in names:
            self.add(repo, prefix + name, (folder / name).read_bytes())

    def __enter__(self) -> HubStandIn:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.shutdown()
        self._server.server_close()

    def gets(self, key: str) -> list[str | None]:
        """The Range headers of the GETs for one file (None: from the start)."""
        with self._lock:
            return [rng for method, path, rng in self.requests if method == "GET" and path.endswith(key.split("/")[-1])]

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        hub = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: object) -> None:
                pass

            def _lookup(self) -> tuple[str, bytes, bool] | None:
                match = re.fullmatch(r"/(.+?/.+?)/resolve/[^/]+/(.+)", self.path)
                if match:
                    key = f"{match.group(1)}/{match.group(2)}"
                    return (key, hub.files[key], True) if key in hub.files else None
                match = re.fullmatch(r"/cdn/(.+)", self.path)
                if match and match.group(1) in hub.files:
                    return match.group(1), hub.files[match.group(1)], False
                return None

            def _not_found(self) -> None:
                self.send_response(404)
                self.send_header("X-Error-Code", "EntryNotFound")
                self.send_header("X-Repo-Commit", COMMIT)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def _record(self) -> None:
                with hub._lock:
                    hub.requests.append((self.command, self.path, self.headers.get("Range")))

            def do_HEAD(self) -> None:
                self._record()
                found = self._lookup()
                if found is None:
                    return self._not_found()
                key, data, on_hub = found
                lfs = len(data) > LFS_ABOVE
                if on_hub and lfs:
                    self.send_response(302)
                    self.send_header("Location", f"http://localhost:{hub.port}/cdn/{key}")
                    self.send_header("X-Linked-Etag", f'"{hashlib.sha256(data).hexdigest()}"')
                    self.send_header("X-Linked-Size", str(len(data)))
                    self.send_header("Content-Length", "0")
                else:
                    self.send_response(200)
                    etag = hashlib.sha256(data).hexdigest() if lfs else git_sha1(data)
                    self.send_header("ETag", f'"{etag}"')
                    self.send_header("Content-Length", str(len(data)))
                self.send_header("X-Repo-Commit", COMMIT)
                self.end_headers()

            def do_GET(self) -> None:
                self._record()
                found = self._lookup()
                if found is None:
                    return self._not_found()
                key, data, _ = found
                if key in hub.corrupt:
                    data = bytes(reversed(data))
                start = 0
                match = re.fullmatch(r"bytes=(\d+)-", self.headers.get("Range") or "")
                if match and int(match.group(1)) < len(data):
                    start = int(match.group(1))
                    self.send_response(206)
                    self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
                else:
                    self.send_response(200)
                body = data[start:]
                self.send_header("Content-Length", str(len(body)))
                self.send_header("X-Repo-Commit", COMMIT)
                self.end_headers()
                with hub._lock:
                    cut = hub.cut_once.pop(key, None)
                if cut is not None and cut < len(body):
                    self.wfile.write(body[:cut])
                    self.wfile.flush()
                    self.close_connection = True
                    self.connection.shutdown(2)
                    return
                gate = hub.hold.get(key)
                if gate is not None:
                    self.wfile.write(body[: len(body) // 2])
                    self.wfile.flush()
                    gate.wait(120)
                    body = body[len(body) // 2 :]
                pause = hub.slow.get(key, 0.0) / 20
                for i in range(20 if pause else 1):
                    piece = body[i * -(-len(body) // 20) : (i + 1) * -(-len(body) // 20)] if pause else body
                    self.wfile.write(piece)
                    self.wfile.flush()
                    time.sleep(pause)

        return Handler
