"""/metrics and /healthz on the one HTTP stack (Starlette + uvicorn), served in-process over real HTTP."""

from __future__ import annotations

import httpx
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from dhwatch.asgi import ThreadedAsgiServer
from dhwatch.metrics import Metrics, metrics_app


def test_metrics_and_health_answers() -> None:
    """/metrics is the Prometheus text, /healthz follows the health callback (503 when stalled), other paths 404, POST 405."""
    metrics = Metrics()
    metrics.set_counts({"done": 3})
    health: list[tuple[int, dict[str, object]]] = [(200, {"status": "ok"})]
    with ThreadedAsgiServer(metrics_app(metrics, lambda: health[0])) as server:
        scraped = httpx.get(server.url + "/metrics")
        assert scraped.status_code == 200 and scraped.headers["content-type"] == CONTENT_TYPE_LATEST
        assert 'dhwatch_files{state="done"} 3.0' in scraped.text
        assert httpx.get(server.url + "/healthz").json() == {"status": "ok"}
        health[0] = (503, {"status": "stalled", "stages": ["upload"]})
        stalled = httpx.get(server.url + "/healthz?verbose=1")
        assert stalled.status_code == 503 and stalled.json()["stages"] == ["upload"]
        head = httpx.head(server.url + "/metrics")
        assert head.status_code == 200 and head.content == b""
        elsewhere = httpx.get(server.url + "/nothing/here")
        assert elsewhere.status_code == 404 and "/metrics" in elsewhere.text
        assert httpx.post(server.url + "/metrics").status_code == 405
