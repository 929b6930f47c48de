"""`distill deploy`: serve the student the way `distill serve` measured best, on 127.0.0.1, until Ctrl-C
or SIGTERM. One llama-server with N slots is served as it is; several processes get a small front that
sends each request to the least busy one. A server process that dies is started again, and said so."""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from distill.artifacts import require_input, stage_dir
from distill.config import PipelineConfig
from distill.models import served_model
from distill.serving.fleet import SERVED_NAME, Server, claim_ports, fleet_label, make_servers, restart_dead, running

log = logging.getLogger(__name__)
HEALTH_EVERY_S = 1.0


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
            def forward(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
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

            do_GET = do_POST = forward

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
    ports = [front_port] if count == 1 else claim_ports(None, count, "")
    servers = make_servers(cfg, model, ports, best["slots_each"], best["threads_each"], log_dir, "deploy")
    what = fleet_label(best["fleet"], count, best["slots_each"])
    with running(servers, cfg.serve.ready_timeout_s):
        front = Front(front_port, servers) if count > 1 else None
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
            if front is not None:
                front.close()
    announce("deploy: stopped; every server process has ended")
