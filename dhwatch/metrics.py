"""Prometheus metrics and a health endpoint (off unless ``metrics_address`` is set).

On a ledger several hosts share (PostgreSQL), each daemon serves its own ``/metrics``: its
counters (bytes, billed seconds, retries, finished files) are its own work; ``dhwatch_files``
is the whole ledger, the same on every host (aggregate it with ``max``, never ``sum``); and
``dhwatch_held_files{host,state}`` is what this host holds now, which does add up across
hosts. ``dhwatch_host_info{host}`` names the host, to join on. See docs/install.md.

``GET /metrics`` is the Prometheus text format (prometheus_client renders it); ``GET
/healthz`` answers 200 ``{"status": "ok"|"paused"}`` while every stage's loop goes round,
and 503 ``{"status": "stalled", ...}`` when one has stopped — what a load balancer or
monitoring check wants. The counters are always kept (they are cheap); only the HTTP
listener is optional.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, disable_created_metrics, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from dhwatch.states import State

if TYPE_CHECKING:  # starlette is imported only when /metrics is served (metrics_address set): issue 12's memory
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import Response

    from dhwatch.config import Settings


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
        #: made on the first :meth:`set_held`: a host alone on its SQLite ledger shows no such series
        self._held: Gauge | None = None
        self._host_info: Gauge | None = None

    def set_counts(self, counts: dict[str, int]) -> None:
        for state in State:
            self.files.labels(state.value).set(counts.get(state.value, 0))

    def set_held(self, host: str, counts: dict[str, int]) -> None:
        """What this host holds on a shared ledger, by state (``dhwatch_held_files{host,state}``)."""
        if self._held is None or self._host_info is None:
            self._held = Gauge("dhwatch_held_files", "Input file versions this host holds a claim on (a ledger "
                               "several hosts share), by state", ["host", "state"], registry=self.registry)  # fmt: skip
            self._host_info = Gauge("dhwatch_host_info", "1, labelled with this host's name (a ledger several hosts "
                                    "share)", ["host"], registry=self.registry)  # fmt: skip
        self._host_info.labels(host).set(1)
        for state in State:
            self._held.labels(host, state.value).set(counts.get(state.value, 0))

    def render(self) -> bytes:
        return generate_latest(self.registry)


def host_name(settings: Settings) -> str:
    """This host's name on a shared ledger (``host_name``: the machine's hostname by default)."""
    return settings.host_name


def metrics_app(metrics: Metrics, health: Callable[[], tuple[int, dict[str, object]]]) -> Starlette:
    """``/metrics`` and ``/healthz`` as a Starlette app (served by :class:`dhwatch.asgi.AsgiServer`).

    Anything else answers 404 with a hint; a method other than GET/HEAD, 405.
    """
    from starlette.applications import Starlette
    from starlette.responses import PlainTextResponse, Response
    from starlette.routing import Route

    async def scrape(request: Request) -> Response:
        return Response(metrics.render(), media_type=CONTENT_TYPE_LATEST)

    async def healthz(request: Request) -> Response:
        code, payload = health()
        return Response(json.dumps(payload).encode() + b"\n", status_code=code, media_type="application/json")

    async def elsewhere(request: Request) -> Response:
        return PlainTextResponse("try /metrics or /healthz\n", status_code=404)

    return Starlette(routes=[
        Route("/metrics", scrape, methods=["GET", "HEAD"]),
        Route("/healthz", healthz, methods=["GET", "HEAD"]),
        Route("/{rest:path}", elsewhere, methods=["GET", "HEAD"]),
    ])  # fmt: skip
