"""``notify_url``: a small JSON POST when a file is done or failed, for a chat bot or a scheduler.

The note is queued in the ledger (``notifications``) in the same step that finishes the file,
so it survives a restart; a separate stage sends it. It never holds a file back: the file is
already DONE or FAILED when its note is queued. A refused or unreachable URL is retried with
capped, jittered backoff, at most :data:`MAX_ATTEMPTS` times over about an hour, then dropped
with a log line. The body carries no secret: the file's inbox path, its recipe, the state, the
output path or the error code and reason (already scrubbed of secrets in the ledger), and the
quality report's summary. The URL is never logged whole (it may hold a token of its own).

Body::

    {"event": "file.done", "file": "podcast/ep1.wav", "recipe": "podcast", "state": "done",
     "output": "/srv/outbox/podcast/ep1.flac", "error": null,
     "quality": {"suggestion": "...", "problems": [...], "loudness_lufs": -16.0, "true_peak_dbtp": -1.2}}
"""

from __future__ import annotations

import json
import urllib.parse
from typing import Any

import httpx

from dhwatch import __version__
from dhwatch.context import Context
from dhwatch.ledger import FileRow, Notification
from dhwatch.naming import display_path
from dhwatch.policy import Backoff
from dhwatch.recipes import Recipe
from dhwatch.states import State

#: tries before a note is dropped (with the backoff below: about an hour in all)
MAX_ATTEMPTS = 10
BACKOFF = Backoff(base=5.0, cap=900.0)
TIMEOUT_SECONDS = 10.0
#: notes sent per round of the stage
_BATCH = 16


def url_for(row: FileRow, top_level: str) -> str:
    """The recipe's own notify_url (as recorded when the file was taken), else the top-level one."""
    if row.recipe_settings:
        own = Recipe.from_snapshot(row.recipe_settings).notify_url
        if own:
            return own
    return top_level


def body_for(row: FileRow, quality: dict[str, Any] | None) -> dict[str, Any]:
    """What a note says about a finished file (no secret: see the module docstring)."""
    done = row.state is State.DONE
    return {
        "event": "file.done" if done else "file.failed",
        "file": display_path(row.rel_path),
        "recipe": row.recipe,
        "state": "done" if done else "failed",
        "output": display_path(row.output_path) if done and row.output_path else None,
        "error": None if done else {"code": row.error_code, "reason": row.error_message},
        "quality": quality,
        "dhwatch_version": __version__,
    }


def quality_summary(report_json: str | None) -> dict[str, Any] | None:
    """The few lines of a quality report a note carries."""
    if not report_json:
        return None
    try:
        report = json.loads(report_json)
    except ValueError:
        return None
    metrics = report.get("metrics", {})

    def after(name: str) -> Any:
        return metrics.get(name, {}).get("actual", {}).get("after")

    return {"suggestion": report.get("suggestion"), "problems": [k for k, v in metrics.items() if v.get("status")],
            "loudness_lufs": after("loudness"), "true_peak_dbtp": after("true_peak")}  # fmt: skip


def enqueue(ctx: Context, row_id: int, *, quality: dict[str, Any] | None = None) -> None:
    """Queue the note about a finished row, if a notify_url applies to it (never raises: a note is a courtesy)."""
    try:
        row = ctx.ledger.get(row_id)
        url = url_for(row, ctx.settings.notify_url)
        if not url:
            return
        ctx.ledger.add_notification(row.id, url, json.dumps(body_for(row, quality), ensure_ascii=False), ctx.clock())
        ctx.kick("notify_url")
    except Exception as exc:  # noqa: BLE001 - the file is finished whatever happens to its note
        ctx.log.warning("notify_not_queued", row=row_id, error=f"{type(exc).__name__}: {exc}")


def _where(url: str) -> str:
    """Scheme, host and path of a URL, without its query or credentials, for the log."""
    parts = urllib.parse.urlsplit(url)
    return f"{parts.scheme}://{parts.hostname or ''}{f':{parts.port}' if parts.port else ''}{parts.path}"


class NotifyStage:
    """Sends queued notes, oldest first; idle (no request, no log line) while nothing is due."""

    def __init__(self, ctx: Context) -> None:
        self.ctx = ctx
        self._client: httpx.AsyncClient | None = None

    async def run(self) -> None:
        ctx = self.ctx
        while True:
            notes = ctx.ledger.due_notifications(ctx.clock(), _BATCH)
            for note in notes:
                await self._send(note)
            if notes:
                continue
            due = ctx.ledger.next_notification_at()
            await ctx.idle("notify_url", 3600.0 if due is None else max(0.05, due - ctx.clock()))

    async def _send(self, note: Notification) -> None:
        ctx = self.ctx
        if self._client is None:
            self._client = httpx.AsyncClient(timeout=TIMEOUT_SECONDS, follow_redirects=False,
                                             headers={"User-Agent": f"dhwatch/{__version__}"})  # fmt: skip
        error: str
        try:
            response = await self._client.post(note.url, content=note.body.encode(),
                                               headers={"Content-Type": "application/json"})  # fmt: skip
            if 200 <= response.status_code < 300:
                ctx.ledger.notification_done(note.id)
                ctx.log.info("notify_sent", row=note.file_id, url=_where(note.url), attempts=note.attempts + 1)
                return
            error = f"HTTP {response.status_code}"
        except httpx.HTTPError as exc:
            error = f"{type(exc).__name__}: {exc}"
        attempts = note.attempts + 1
        if attempts >= MAX_ATTEMPTS:
            ctx.ledger.notification_done(note.id)
            ctx.log.warning("notify_dropped", row=note.file_id, url=_where(note.url), attempts=attempts, error=error)
            return
        delay = BACKOFF.delay(attempts, ctx.rand())
        ctx.ledger.notification_retry(note.id, attempts, ctx.clock() + delay)
        ctx.log.info("notify_retry", row=note.file_id, url=_where(note.url), attempts=attempts, error=error,
                     retry_in_seconds=round(delay, 1))  # fmt: skip

    async def aclose(self) -> None:
        if self._client is not None:
            await self._client.aclose()
            self._client = None
