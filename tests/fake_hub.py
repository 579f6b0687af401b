"""A loopback stand-in for the Hugging Face Hub: just enough of its HTTP API for ``push_to_hub`` (create a repo,
pre-upload, commit files inline) and for downloads (``resolve``, model info). Files live in memory; no LFS.

    with FakeHub() as hub:      # sets HF_ENDPOINT in the environment of child processes you start with hub.env
        ...

``FakeHub(answer=False)`` is a server that accepts every connection and never answers (no status line, no byte):
what a stalled proxy or a hung Hub looks like to a client. ``FakeHub(stall=regex)`` answers every request except
those whose path matches ``regex``, which it holds the same way. ``hub.connections`` counts the connections accepted,
``hub.stalled`` the requests held.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import json
import os
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class _Repos:
    def __init__(self):
        self.files: dict[str, dict[str, bytes]] = {}
        self.commits: dict[str, str] = {}
        self.lock = threading.Lock()

    def commit(self, repo: str, files: dict[str, bytes]) -> str:
        with self.lock:
            self.files.setdefault(repo, {}).update(files)
            digest = hashlib.sha1(
                json.dumps(sorted((k, hashlib.sha1(v).hexdigest()) for k, v in self.files[repo].items())).encode()
            ).hexdigest()
            self.commits[repo] = digest
            return digest


@contextlib.contextmanager
def hub_online():
    """Tests run with the Hub off (conftest.py); one that talks to a loopback Hub turns huggingface_hub's offline flag
    (read by every request it makes) and the variable (read by peft) off for its duration."""
    import huggingface_hub.constants as hub_constants

    flag, variable = hub_constants.HF_HUB_OFFLINE, os.environ.get("HF_HUB_OFFLINE")
    hub_constants.HF_HUB_OFFLINE = False
    os.environ["HF_HUB_OFFLINE"] = "0"
    try:
        yield
    finally:
        hub_constants.HF_HUB_OFFLINE = flag
        if variable is None:
            os.environ.pop("HF_HUB_OFFLINE", None)
        else:
            os.environ["HF_HUB_OFFLINE"] = variable


def _silent_handler(hub: "FakeHub"):
    class Silent(BaseHTTPRequestHandler):
        def handle(self):  # accept, count, then hold the connection open without a byte until the hub stops
            with hub.lock:
                hub.connections += 1
            hub.stopped.wait()

    return Silent


def _handler(repos: _Repos, endpoint_ref: list, hub: "FakeHub", stall: str | None):
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args):  # quiet
            pass

        def handle(self):
            with hub.lock:
                hub.connections += 1
            super().handle()

        def _send(self, status: int, body: bytes = b"", headers: dict | None = None, head: bool = False):
            self.send_response(status)
            for key, value in {"Content-Length": str(len(body)), **(headers or {})}.items():
                self.send_header(key, value)
            self.end_headers()
            if not head:
                self.wfile.write(body)

        def _json(self, status: int, value) -> None:
            self._send(status, json.dumps(value).encode(), {"Content-Type": "application/json"})

        def _body(self) -> bytes:
            return self.rfile.read(int(self.headers.get("Content-Length", 0)))

        def _stalls(self) -> bool:
            if stall is None or not re.search(stall, self.path.split("?")[0]):
                return False
            with hub.lock:
                hub.stalled += 1
            hub.stopped.wait()
            self.close_connection = True
            return True

        def do_POST(self):
            if self._stalls():
                return
            path = self.path.split("?")[0]
            body = self._body()
            if path == "/api/repos/create":
                request = json.loads(body)
                repo = (
                    f"{request.get('organization') or 'user'}/{request['name']}"
                    if "/" not in request["name"]
                    else request["name"]
                )
                repos.files.setdefault(repo, {})
                return self._json(200, {"url": f"{endpoint_ref[0]}/{repo}", "name": repo, "id": repo})
            if path == "/api/validate-yaml":
                return self._json(200, {})
            match = re.fullmatch(r"/api/models/(.+)/preupload/([^/]+)", path)
            if match:
                files = json.loads(body)["files"]
                return self._json(
                    200, {"files": [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False} for f in files]}
                )
            match = re.fullmatch(r"/api/models/(.+)/commit/([^/]+)", path)
            if match:
                repo, files = match.group(1), {}
                for line in body.splitlines():
                    item = json.loads(line)
                    if item["key"] == "file":
                        files[item["value"]["path"]] = base64.b64decode(item["value"]["content"])
                sha = repos.commit(repo, files)
                return self._json(
                    200, {"commitUrl": f"{endpoint_ref[0]}/{repo}/commit/{sha}", "commitOid": sha, "success": True}
                )
            return self._json(404, {"error": f"not faked: POST {path}"})

        def _get(self, head: bool):
            if self._stalls():
                return
            path = self.path.split("?")[0]
            match = re.fullmatch(r"/api/models/(.+?)(?:/revision/([^/]+))?", path)
            if match and match.group(1) in repos.files:
                repo = match.group(1)
                return self._json(
                    200,
                    {
                        "id": repo,
                        "modelId": repo,
                        "sha": repos.commits.get(repo, "0" * 40),
                        "siblings": [{"rfilename": name} for name in sorted(repos.files[repo])],
                        "private": False,
                    },
                )
            match = re.fullmatch(r"/(.+)/resolve/([^/]+)/(.+)", path)
            if match and match.group(3) in repos.files.get(match.group(1), {}):
                repo, name = match.group(1), match.group(3)
                content = repos.files[repo][name]
                etag = hashlib.sha1(content).hexdigest()
                headers = {
                    "ETag": f'"{etag}"',
                    "X-Repo-Commit": repos.commits[repo],
                    "Content-Type": "application/octet-stream",
                }
                return self._send(200, content, headers, head=head)
            error = {"X-Error-Code": "EntryNotFound" if "/resolve/" in path else "RepoNotFound"}
            return self._send(404, b"{}", {**error, "Content-Type": "application/json"}, head=head)

        def do_GET(self):
            self._get(head=False)

        def do_HEAD(self):
            self._get(head=True)

    return Handler


class FakeHub:
    def __init__(self, answer: bool = True, stall: str | None = None):
        self.repos = _Repos()
        self._endpoint = [""]
        self.connections = self.stalled = 0
        self.lock = threading.Lock()
        self.stopped = threading.Event()
        handler = _handler(self.repos, self._endpoint, self, stall) if answer else _silent_handler(self)
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self.endpoint = f"http://127.0.0.1:{self.server.server_address[1]}"
        self._endpoint[0] = self.endpoint
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def env(self, base: dict) -> dict:
        return {
            **base,
            "HF_ENDPOINT": self.endpoint,
            "HF_TOKEN": "hf_fake_token_for_tests",
            "HF_HUB_DISABLE_XET": "1",
            "HF_HUB_OFFLINE": "0",
            "HF_HUB_DISABLE_TELEMETRY": "1",
        }

    def __enter__(self):
        self._online = hub_online()
        self._online.__enter__()
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.stopped.set()
        self.server.shutdown()
        self.server.server_close()
        self._online.__exit__(*exc)
