"""FakeHubStandIn: a local HTTP stand-in for the few Hugging Face hub API routes that publishing calls (no network
here). It is not the hub: it implements just what huggingface_hub 2.4.0's ``HfApi.create_repo``,
``create_branch``, ``create_commit`` (``preupload``, ``validate-yaml``, ``commit``) send, as read in its
``hf_api.py`` and ``_commit_api.py``, answers every file as a "regular" (inline base64) upload, and records every
request (path, headers, body) so tests can assert what was sent, and that the token went only into the
Authorization header.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


@dataclass
class Commit:
    repo_id: str
    revision: str
    summary: str
    files: dict[str, bytes]
    oid: str


@dataclass
class FakeHubStandIn:
    """Start with ``with FakeHubStandIn() as hub:``; ``hub.endpoint`` is its base URL."""

    repos: dict[str, dict[str, Any]] = field(default_factory=dict)  # repo id -> {"private": bool, "branches": set}
    commits: list[Commit] = field(default_factory=list)
    requests: list[dict[str, Any]] = field(default_factory=list)  # {"method", "path", "headers" (lower-case), "body"}
    validated: list[str] = field(default_factory=list)  # README texts sent to /api/validate-yaml
    accept_token: str | None = None  # set: any other bearer token gets 401, as the hub answers a bad token

    def __enter__(self) -> FakeHubStandIn:
        hub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:  # quiet
                return None

            def do_GET(self) -> None:
                hub._record(self, b"")
                self._send(404, {"error": "Repository Not Found"}, {"X-Error-Code": "RepoNotFound"})

            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                hub._record(self, body)
                if hub.accept_token and self.headers.get("Authorization") != f"Bearer {hub.accept_token}":
                    self._send(401, {"error": "Invalid credentials in Authorization header"})
                    return
                status, reply = hub._route(self.path.split("?", 1)[0], body)
                self._send(status, reply)

            def _send(self, status: int, reply: Any, headers: dict[str, str] | None = None) -> None:
                data = json.dumps(reply).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                for k, v in (headers or {}).items():
                    self.send_header(k, v)
                self.end_headers()
                self.wfile.write(data)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.endpoint = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()

    def _record(self, handler: BaseHTTPRequestHandler, body: bytes) -> None:
        headers = {k.lower(): v for k, v in handler.headers.items()}
        self.requests.append({"method": handler.command, "path": handler.path, "headers": headers, "body": body})

    def _route(self, path: str, body: bytes) -> tuple[int, Any]:
        if path == "/api/repos/create":
            data = json.loads(body)
            repo_id = f"{data['organization']}/{data['name']}" if data.get("organization") else data["name"]
            if repo_id in self.repos:
                return 409, {"error": "You already created this model repo", "url": f"{self.endpoint}/{repo_id}"}
            self.repos[repo_id] = {"private": data.get("visibility") == "private", "branches": {"main"}}
            return 200, {"url": f"{self.endpoint}/{repo_id}", "name": repo_id}
        if path == "/api/validate-yaml":
            self.validated.append(json.loads(body)["content"])
            return 200, {"errors": [], "warnings": []}
        m = re.fullmatch(r"/api/models/([^/]+/[^/]+)/(preupload|commit|branch)/(.+)", path)
        if not m or m.group(1) not in self.repos:
            return 404, {"error": f"not implemented by the stand-in (or no such repo): {path}"}
        repo_id, action, revision = m.groups()
        repo = self.repos[repo_id]
        if action == "branch":
            repo["branches"].add(revision)
            return 200, {}
        if revision not in repo["branches"]:
            return 404, {"error": f"Invalid rev id: {revision}"}
        if action == "preupload":
            files = json.loads(body)["files"]
            return 200, {"files": [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False, "oid": None}
                                   for f in files]}
        lines = [json.loads(line) for line in body.splitlines() if line.strip()]
        header = next(x["value"] for x in lines if x["key"] == "header")
        files = {x["value"]["path"]: base64.b64decode(x["value"]["content"]) for x in lines if x["key"] == "file"}
        oid = hashlib.sha1(body).hexdigest()
        self.commits.append(Commit(repo_id, revision, header["summary"], files, oid))
        return 200, {"commitUrl": f"{self.endpoint}/{repo_id}/commit/{oid}", "commitOid": oid,
                     "pullRequestUrl": None}
