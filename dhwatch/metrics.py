"""Prometheus metrics and a health endpoint (off unless ``metrics_address`` is set).

``GET /metrics`` is the Prometheus text format (prometheus_client renders it); ``GET
/healthz`` answers 200 ``{"status": "ok"|"paused"}`` while every stage's loop goes round,
and 503 ``{"status": "stalled", ...}`` when one has stopped — what a load balancer or
monitoring check wants. The counters are always kept (they are cheap); only the HTTP
listener is optional.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, disable_created_metrics, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from dhwatch.states import State


disable_created_metrics()  # the *_created series only add noise for a single long-lived process


class Metrics:
    """The daemon's metrics, in a registry of their own."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.files = Gauge("dhwatch_files", "Input file versions by ledger state", ["state"], registry=r)
        self.bytes_up = Counter("dhwatch_upload_bytes", "Bytes of audio submitted", registry=r)
        self.bytes_down = Counter("dhwatch_download_bytes", "Bytes of results written to the outbox", registry=r)
        self.api_latency = Histogram(
            "dhwatch_api_seconds", "Duration of backend calls", ["operation"], registry=r,
            buckets=(0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300),
        )  # fmt: skip
        self.retries = Counter("dhwatch_retries", "Failed attempts that will be retried, by kind", ["kind"], registry=r)
        self.billed = Counter("dhwatch_billed_seconds", "Billed seconds reported by the backend", registry=r)
        self.paused = Gauge("dhwatch_paused", "1 while submitting is paused (bad key, budget, broken engine)",
                            registry=r)
        self.backend_paused = Gauge("dhwatch_backend_paused", "1 while files for this backend are held back "
                                    "(its key refused, the budget, its engine broken)", ["backend"], registry=r)
        self.finished = Counter("dhwatch_finished_files", "Files finished, by outcome", ["outcome"], registry=r)

    def set_counts(self, counts: dict[str, int]) -> None:
        for state in State:
            self.files.labels(state.value).set(counts.get(state.value, 0))

    def render(self) -> bytes:
        return generate_latest(self.registry)


async def serve(address: str, metrics: Metrics, health: Callable[[], tuple[int, dict[str, object]]]) -> asyncio.Server:
    """Listen on ``host:port`` for ``/metrics`` and ``/healthz`` (a tiny HTTP/1.0 responder)."""
    host, _, port = address.rpartition(":")

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            request_line = await asyncio.wait_for(reader.readline(), 5)
            while (await asyncio.wait_for(reader.readline(), 5)) not in (b"\r\n", b"\n", b""):
                pass
            parts = request_line.decode("latin-1").split()
            path = parts[1].split("?", 1)[0] if len(parts) >= 2 else ""
            if len(parts) < 2 or parts[0] not in ("GET", "HEAD"):
                status, ctype, body = 405, "text/plain", b"method not allowed\n"
            elif path == "/metrics":
                status, ctype, body = 200, CONTENT_TYPE_LATEST, metrics.render()
            elif path == "/healthz":
                code, payload = health()
                status, ctype, body = code, "application/json", json.dumps(payload).encode() + b"\n"
            else:
                status, ctype, body = 404, "text/plain", b"try /metrics or /healthz\n"
            head = f"HTTP/1.0 {status} {'OK' if status == 200 else 'ERROR'}\r\nContent-Type: {ctype}\r\n"
            head += f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
            writer.write(head.encode() + (body if parts and parts[0] != "HEAD" else b""))
            await writer.drain()
        except (TimeoutError, ConnectionError):
            pass
        finally:
            writer.close()

    return await asyncio.start_server(handle, host or "127.0.0.1", int(port))
