"""`distill deploy`: serve the student the way `distill serve` measured best, on 127.0.0.1, until Ctrl-C
or SIGTERM. A small front stands before the server(s): it answers a request the servers would fail on (an
unknown route, a body that is not a JSON object, one too large) with a 4xx and its reason, and sends the
rest to the least busy server. A server process that dies is started again, and said so."""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import urlsplit

from distill.artifacts import require_input, stage_dir
from distill.config import PipelineConfig
from distill.models import served_model
from distill.serving.fleet import SERVED_NAME, Server, claim_ports, fleet_label, make_servers, restart_dead, running

log = logging.getLogger(__name__)
HEALTH_EVERY_S = 1.0
# What the front passes on, by route: the OpenAI-compatible API, health and metrics
ROUTES = {
    "/health": "GET",
    "/metrics": "GET",
    "/v1/models": "GET",
    "/v1/chat/completions": "POST",
    "/v1/completions": "POST",
}
# A prompt with its catalog and a grammar is tens to hundreds of KB; this leaves room for long contexts
MAX_BODY_BYTES = 16 * 2**20


def refusal(method: str, path: str, headers: Any) -> tuple[int, str] | None:
    """(status, one-line reason) for a request the front answers itself before any body is read; None to read on."""
    route = urlsplit(path).path
    if route not in ROUTES:
        return 404, f"no route {route}; this server answers {', '.join(ROUTES)}"
    if method != ROUTES[route]:
        return 405, f"{route} takes {ROUTES[route]}, not {method}"
    if "chunked" in headers.get("Transfer-Encoding", "").lower():
        return 411, "send the body with a Content-Length, not chunked"
    length = headers.get("Content-Length") or "0"
    if not length.isdigit():
        return 400, f"Content-Length {length!r} is not a number of bytes"
    if int(length) > MAX_BODY_BYTES:
        return 413, f"body of {int(length):,} bytes; at most {MAX_BODY_BYTES:,}"
    return None


def body_problem(body: bytes) -> str | None:
    """Why a POST body cannot be a request: llama-server answers a body that is not JSON with a 500."""
    try:
        value = json.loads(body)
    except (UnicodeDecodeError, ValueError) as exc:
        return f"the body is not JSON ({str(exc).splitlines()[0]})"
    return None if isinstance(value, dict) else "the body must be a JSON object"


class Front:
    """Spreads requests over several servers (fewest in flight first), streaming answers through."""

    def __init__(self, port: int, servers: list[Server]):
        import httpx

        self.servers = servers
        self.in_flight = [0] * len(servers)
        self.lock = threading.Lock()
        self.client = httpx.Client(timeout=None)
        front = self

        class Handler(BaseHTTPRequestHandler):
            def refuse(self, status: int, reason: str) -> None:
                payload = json.dumps({"error": {"code": status, "message": reason, "type": "invalid_request_error"}})
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(payload)))
                if status == 405:
                    self.send_header("Allow", ROUTES[urlsplit(self.path).path])
                self.send_header("Connection", "close")  # an unread body must not be taken for the next request
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(payload.encode())

            def forward(self) -> None:
                if refused := refusal(self.command, self.path, self.headers):
                    return self.refuse(*refused)
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                if self.command == "POST" and (problem := body_problem(body)):
                    return self.refuse(400, problem)
                index = front.pick()
                started = False
                try:
                    headers = {k: v for k, v in self.headers.items() if k.lower() in ("content-type", "authorization")}
                    request = front.client.build_request(
                        self.command, front.servers[index].url + self.path, content=body, headers=headers
                    )
                    response = front.client.send(request, stream=True)
                    try:
                        self.send_response(response.status_code)
                        if "content-type" in response.headers:
                            self.send_header("Content-Type", response.headers["content-type"])
                        self.send_header("Connection", "close")  # the body ends when the connection does
                        self.end_headers()
                        started = True
                        for chunk in response.iter_bytes():  # decoded: no content encoding is passed on
                            self.wfile.write(chunk)
                            self.wfile.flush()
                    finally:
                        response.close()
                except httpx.HTTPError as exc:
                    if not started:  # after the status line, a broken answer can only end early
                        self.send_error(502, f"server on port {front.servers[index].port}: {exc}")
                finally:
                    front.release(index)

            do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = do_HEAD = do_OPTIONS = forward

            def log_message(self, *args: Any) -> None:  # the servers keep their own logs
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", port), Handler)
        self.httpd.daemon_threads = True
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def pick(self) -> int:
        with self.lock:
            # a server being restarted is skipped until it answers again
            alive = [i for i, s in enumerate(self.servers) if s.alive() and s.ready] or list(range(len(self.servers)))
            index = min(alive, key=lambda i: self.in_flight[i])
            self.in_flight[index] += 1
            return index

    def release(self, index: int) -> None:
        with self.lock:
            self.in_flight[index] -= 1

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        self.client.close()


def deploy(cfg: PipelineConfig, port: int, announce: Callable[[str], None]) -> None:

    require_input(cfg, "serve")
    best = json.loads((stage_dir(cfg, "serve") / "report.json").read_text(encoding="utf-8"))["best"]
    model = served_model(cfg)
    log_dir = cfg.run_path / "deploy" / "logs"
    log_dir.mkdir(parents=True, exist_ok=True)
    count = best["servers"]
    front_port = claim_ports(port, 1, "--port")[0]
    servers = make_servers(
        cfg, model, claim_ports(None, count, ""), best["slots_each"], best["threads_each"], log_dir, "deploy"
    )
    what = fleet_label(best["fleet"], count, best["slots_each"])
    with running(servers, cfg.serve.ready_timeout_s):
        front = Front(front_port, servers)
        try:
            announce(f"base URL: http://127.0.0.1:{front_port}/v1")
            announce(f"model: {SERVED_NAME}")
            announce(f"serving {what} (logs in {log_dir}); stop with Ctrl-C or SIGTERM")
            while True:
                time.sleep(HEALTH_EVERY_S)
                restart_dead(servers, cfg.serve.ready_timeout_s, lambda note: log.warning("deploy: %s", note))
        except KeyboardInterrupt:
            log.info("deploy: stopping")
        finally:
            front.close()
    announce("deploy: stopped; every server process has ended")
