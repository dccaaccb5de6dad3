"""The studio's web page: routes (Starlette), wired to the ledger reader, the live feed and the actions.

Read-only views: ``/`` (the list), ``/files/<id>`` (one file), ``/api/files[/<id>]`` (JSON),
``/events`` (server-sent events), the audio and spectrogram files. Actions (POST, behind
the token, CSRF-checked): ``/files/<id>/retry`` and ``/retry-failed``. ``/login`` gives a
browser a session. See docs/web.md.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import os
import time
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from starlette.applications import Starlette
from starlette.datastructures import QueryParams
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, RedirectResponse, Response, StreamingResponse
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from dhwatch.commands._format import holder_text
from dhwatch.commands.retry import Outcome
from dhwatch.config import Settings
from dhwatch.ledger import FileRow
from dhwatch.notice import next_step
from dhwatch.policy import day_start
from dhwatch.states import State
from dhwatch.web import actions, data, media
from dhwatch.web.auth import SESSION_COOKIE, SESSION_SECONDS, Caller, Sessions, cross_site, csrf_ok, identify, safe_next
from dhwatch.web.feed import Batch, ChangeFeed, Closed
from dhwatch.web.spectrograms import RENDERER, SpectrogramMaker
from dhwatch.web.templates import TEMPLATE_DIR, environment, error_text, file_json, quality_table

STATIC_DIR = TEMPLATE_DIR.with_name("static")
#: a page that answers "cannot keep up" gets this hint to reconnect (milliseconds)
SSE_RETRY_MS = 3000
#: a comment line on an open event stream this often, so proxies and browsers keep it open
SSE_KEEPALIVE_SECONDS = 25.0
#: threads of the page's own (queries, rendering, opening files): a page is a side show of the daemon
WEB_THREADS = 2
#: pause after a wrong token, against guessing (the loop is not blocked)
WRONG_TOKEN_DELAY = 0.5

#: Content-Security-Policy: everything from the daemon itself, nothing inline, no frames
_SECURITY_HEADERS = [
    (b"content-security-policy", b"default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; "
                                 b"media-src 'self'; connect-src 'self'; form-action 'self'; base-uri 'none'; "
                                 b"frame-ancestors 'none'"),
    (b"x-content-type-options", b"nosniff"),
    (b"referrer-policy", b"same-origin"),
    (b"x-frame-options", b"DENY"),
]  # fmt: skip


class SecurityHeaders:
    """Adds :data:`_SECURITY_HEADERS` to every response (a plain ASGI wrapper: streams stay streams)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def sending(message: Message) -> None:
            if message["type"] == "http.response.start":
                present = {k.lower() for k, _ in message.get("headers", [])}
                message["headers"] = list(message.get("headers", [])) + [
                    (k, v) for k, v in _SECURITY_HEADERS if k not in present
                ]
            await send(message)

        await self.app(scope, receive, sending)


def parse_filter(params: QueryParams, *, default_limit: int = 100) -> data.FileFilter:
    """The list's filter from GET parameters; an unknown state or a bad number is ignored, never an error."""
    try:
        state: State | None = State(params.get("state", ""))
    except ValueError:
        state = None
    folder = params.get("folder")
    folder = None if folder is None or folder == "*" else folder.strip("/")

    def number(name: str, default: int | None) -> int | None:
        value = params.get(name, "")
        return int(value) if value.isdigit() and len(value) < 12 else default

    limit = number("limit", default_limit) or default_limit
    return data.FileFilter(state=state, folder=folder, text=params.get("q", "").strip()[:200],
                           before_id=number("before", None), limit=min(limit, data.MAX_LIMIT))  # fmt: skip


@dataclass
class WebPage:
    """The page's app and what it holds (the live feed, the sessions); :meth:`aclose` before the server stops."""

    settings: Settings
    #: called with an inbox path each time a file is put back (the daemon looks at it at once)
    on_retried: Callable[[str], None] | None = None
    clock: Callable[[], float] = time.time
    feed_interval: float = 1.0
    log: Any = None
    #: the spectrogram renderer, ``module:function`` (tests name a stand-in until the real one is merged)
    spectrogram_renderer: str = RENDERER
    app: Starlette = field(init=False)
    feed: ChangeFeed = field(init=False)
    sessions: Sessions = field(init=False)

    def __post_init__(self) -> None:
        self._threads = ThreadPoolExecutor(WEB_THREADS, thread_name_prefix="web")
        self.reader = data.LedgerReader(self.settings.state_dir, self._threads, url=self.settings.ledger_url,
                                        password=self.settings.ledger_password() if self.settings.ledger_url else None)
        self.feed = ChangeFeed(self.reader, self.feed_interval, on_error=self._feed_error)
        self.sessions = Sessions(self.settings.web.resolve_token)
        self.spectrograms = SpectrogramMaker(self.spectrogram_renderer)
        self._guesses = asyncio.Lock()
        self.env = environment()
        routes = [
            Route("/", self.index),
            Route("/api/files", self.api_files),
            Route("/api/files/{file_id:int}", self.api_file),
            Route("/files/{file_id:int}", self.file_page),
            Route("/files/{file_id:int}/audio/{side}", self.audio),
            Route("/files/{file_id:int}/spectrogram/{side}.png", self.spectrogram),
            Route("/files/{file_id:int}/retry", self.retry, methods=["POST"]),
            Route("/retry-failed", self.retry_failed, methods=["POST"]),
            Route("/login", self.login_form, methods=["GET"]),
            Route("/login", self.login, methods=["POST"]),
            Route("/logout", self.logout, methods=["POST"]),
            Route("/events", self.events),
            Mount("/static", StaticFiles(directory=STATIC_DIR), name="static"),
        ]
        self.app = Starlette(routes=routes)
        self.asgi: ASGIApp = SecurityHeaders(self.app)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await self.asgi(scope, receive, send)

    async def aclose(self) -> None:
        """End the open event streams and kill a spectrogram worker (stopping never waits for a browser)."""
        await self.feed.aclose()
        await self.spectrograms.aclose()
        self._threads.shutdown(wait=False)
        self.reader.close()

    async def _slow_down(self) -> None:
        """After a wrong token: wait, one wrong guess at a time for the whole page (a script
        guessing in parallel gets no more than two tries a second)."""
        async with self._guesses:
            await asyncio.sleep(WRONG_TOKEN_DELAY)

    def _feed_error(self, exc: Exception) -> None:
        if self.log is not None:
            self.log.warning("web_feed_read_failed", error=str(exc))

    # ------------------------------------------------------------------ helpers
    async def render(self, request: Request, name: str, status: int = 200, **context: Any) -> HTMLResponse:
        """A page from its template, rendered in a worker thread (a list of 100 rows is ~20 ms of
        Python that the daemon's event loop need not sit through in one piece)."""
        caller: Caller = context.pop("caller", None) or identify(request, self.sessions)
        page = await self.reader.call(functools.partial(
            self.env.get_template(name).render, request=request, caller=caller, auth_enabled=self.sessions.enabled,
            now=self.clock(), public_read=self.settings.web.public_read, shared=self.shared, **context,
        ))  # fmt: skip
        return HTMLResponse(page, status_code=status, headers={"Cache-Control": "no-store"})

    @property
    def shared(self) -> bool:
        """Whether several hosts share the ledger (PostgreSQL): then the page shows which host holds each file."""
        return bool(self.settings.ledger_url)

    def row_html(self, row: FileRow) -> str:
        return self.env.get_template("_row.html").render(row=row, now=self.clock(), shared=self.shared)

    async def denied(self, request: Request, *, api: bool = False) -> Response | None:
        """None when the read-only views are open to this request; a 401 otherwise."""
        if self.settings.web.public_read or identify(request, self.sessions).authenticated:
            return None
        if api or "text/html" not in request.headers.get("accept", ""):
            return JSONResponse({"error": "the token is required (Authorization: Bearer <token>)"},
                                status_code=401, headers={"WWW-Authenticate": "Bearer"})  # fmt: skip
        return await self.render(request, "login.html", status=401, next=safe_next(request.url.path), wrong=False)

    async def _row(self, file_id: int) -> FileRow | None:
        return await self.reader.run(lambda c: data.file_row(c, file_id))

    # ------------------------------------------------------------------ read-only views
    async def index(self, request: Request) -> Response:
        if (refused := await self.denied(request)) is not None:
            return refused
        flt = parse_filter(request.query_params)
        now = self.clock()

        lease_seconds = self.settings.lease_seconds

        def read(conn: Any) -> tuple[int, list[FileRow], list[str], data.Overview, tuple[list[Any], float]]:
            total, rows = data.list_files(conn, flt)
            hosts = data.hosts(conn, lease_seconds) if self.shared else ([], now)
            return total, rows, data.top_folders(conn), data.overview(conn, day_start(now)), hosts

        total, rows, folders, overview, (hosts, ledger_now) = await self.reader.run(read)
        return await self.render(
            request, "index.html", rows=rows, total=total, flt=flt, folders=folders, overview=overview,
            pause_next=None if overview.paused is None else next_step(
                overview.paused_kind or "auth", recheck_seconds=self.settings.auth_recheck_interval),
            budget=self.settings.daily_budget_seconds, query=str(request.query_params),
            next_page=self._next_page(request, flt, rows), failed=overview.counts.get(State.FAILED, 0),
            first_page="/?" + str(QueryParams({k: v for k, v in request.query_params.items() if k != "before"})),
            hosts=hosts, ledger_now=ledger_now,
        )  # fmt: skip

    @staticmethod
    def _next_page(request: Request, flt: data.FileFilter, rows: list[FileRow]) -> str | None:
        if len(rows) < flt.limit or not rows:
            return None
        params = dict(request.query_params)
        params["before"] = str(rows[-1].id)
        return f"{request.url.path}?{QueryParams(params)}"

    async def api_files(self, request: Request) -> Response:
        if (refused := await self.denied(request, api=True)) is not None:
            return refused
        flt = parse_filter(request.query_params)
        total, rows = await self.reader.run(lambda c: data.list_files(c, flt))
        now = self.clock()
        headers = {"X-Total-Count": str(total), "Cache-Control": "no-store"}
        next_page = self._next_page(request, flt, rows)
        if next_page is not None:
            headers["Link"] = f'<{next_page}>; rel="next"'
        return JSONResponse([file_json(r, now, hosts=self.shared) for r in rows], headers=headers)

    async def api_file(self, request: Request) -> Response:
        if (refused := await self.denied(request, api=True)) is not None:
            return refused
        file_id = request.path_params["file_id"]
        found = await self.reader.run(lambda c: (data.file_row(c, file_id), data.file_history(c, file_id)))
        row, history = found
        if row is None:
            return JSONResponse({"error": f"no file {file_id}"}, status_code=404)
        from dhwatch.commands._format import event_json

        body = file_json(row, self.clock(), hosts=self.shared)
        body["history"] = [event_json(e) for e in history]
        explained = error_text(row)
        body["error"] = None if explained is None else {"code": explained.code, "reason": explained.reason,
                                                         "what_to_do": explained.what_to_do}  # fmt: skip
        body["quality"] = json.loads(row.quality) if row.quality else None
        return JSONResponse(body, headers={"Cache-Control": "no-store"})

    async def file_page(self, request: Request) -> Response:
        if (refused := await self.denied(request)) is not None:
            return refused
        file_id = request.path_params["file_id"]
        row, history, ledger_now = await self.reader.run(
            lambda c: (data.file_row(c, file_id), data.file_history(c, file_id), data.holder_clock(c)))
        if row is None:
            return await self.render(request, "message.html", status=404, title="No such file",
                               messages=[f"dhwatch has no file number {file_id}."], ok=False)  # fmt: skip
        newer = await self.reader.run(lambda c: data.newer_version(c, row))
        lines, suggestion = quality_table(row)
        before, _ = media.audio_source(self.settings, row, "before")
        after, _ = media.audio_source(self.settings, row, "after")
        # a player only for a file that is there (an operator may have deleted a failed file)
        exists = await self.reader.call(lambda: [p is not None and os.path.isfile(p) for p in (before, after)])
        return await self.render(
            request, "file.html", row=row, history=history, error=error_text(row), quality=lines,
            quality_suggestion=suggestion, has_before=exists[0], has_after=exists[1], newer=newer,
            holder=None if ledger_now is None else holder_text(row, ledger_now),
        )  # fmt: skip

    async def audio(self, request: Request) -> Response:
        if (refused := await self.denied(request)) is not None:
            return refused
        side = request.path_params["side"]
        row = await self._row(request.path_params["file_id"])
        if side not in media.SIDES or row is None:
            return Response("not found\n", status_code=404, media_type="text/plain")
        path, roots = media.audio_source(self.settings, row, side)
        if path is None:
            return Response("this file has no such audio now\n", status_code=404, media_type="text/plain")
        try:
            return await self.reader.call(media.file_response, path, roots, media.audio_type(path))
        except media.NotServable:
            return Response("this file has no such audio now\n", status_code=404, media_type="text/plain")

    async def spectrogram(self, request: Request) -> Response:
        if (refused := await self.denied(request)) is not None:
            return refused
        side = request.path_params["side"]
        if side not in media.SIDES:
            return Response("not found\n", status_code=404, media_type="text/plain")
        file_id = request.path_params["file_id"]
        path = media.spectrogram_path(self.settings.state_dir, file_id, side)
        serve = functools.partial(media.file_response, path, (media.spectrogram_dir(self.settings.state_dir),),
                                  "image/png", cache="max-age=3600")  # fmt: skip
        with contextlib.suppress(media.NotServable):
            return await self.reader.call(serve)
        row = await self._row(file_id)
        source, roots = media.audio_source(self.settings, row, side) if row is not None else (None, ())
        if source is not None and self.spectrograms.available:
            try:
                fd, _ = await self.reader.call(media.open_inside, source, roots)
            except media.NotServable:
                fd = -1
            if fd >= 0 and await self.spectrograms.make(fd, path):
                with contextlib.suppress(media.NotServable):
                    return await self.reader.call(serve)
        return Response("no spectrogram for this file\n", status_code=404, media_type="text/plain")

    # ------------------------------------------------------------------ live updates
    async def events(self, request: Request) -> Response:
        if (refused := await self.denied(request, api=True)) is not None:
            return refused
        flt = parse_filter(request.query_params)
        try:
            queue = self.feed.subscribe()
        except Closed:
            return Response("stopping\n", status_code=503, media_type="text/plain")

        async def stream() -> AsyncIterator[bytes]:
            try:
                await self.feed.started.wait()  # from here on, no change is missed
                yield f"retry: {SSE_RETRY_MS}\n: connected\n\n".encode()
                while True:
                    try:  # asyncio.timeout: Python 3.11's wait_for can drop a cancel (a page closed at shutdown)
                        async with asyncio.timeout(SSE_KEEPALIVE_SECONDS):
                            batch: Batch = await queue.get()
                    except TimeoutError:
                        yield b": keep-alive\n\n"
                        continue
                    if batch is None:
                        return
                    for row in batch:
                        payload = {"id": row.id, "state": row.state.value, "matches": flt.matches(row),
                                   "html": self.row_html(row)}  # fmt: skip
                        yield f"event: file\nid: {row.id}\ndata: {json.dumps(payload)}\n\n".encode()
            finally:
                self.feed.unsubscribe(queue)

        return StreamingResponse(stream(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-store", "X-Accel-Buffering": "no"})  # fmt: skip

    # ------------------------------------------------------------------ auth
    async def login_form(self, request: Request) -> Response:
        return await self.render(request, "login.html", next=safe_next(request.query_params.get("next")), wrong=False)

    async def login(self, request: Request) -> Response:
        if cross_site(request):
            return await self.render(request, "message.html", status=403, title="Refused",
                               messages=["A login from another site was refused."], ok=False)  # fmt: skip
        form = await request.form()
        target = safe_next(str(form.get("next") or "/"))
        token = form.get("token")
        sid = self.sessions.login(token if isinstance(token, str) else None)
        if sid is None:
            await self._slow_down()
            status = 401 if self.sessions.enabled else 403
            return await self.render(request, "login.html", status=status, next=target, wrong=True)
        response = RedirectResponse(target, status_code=303)
        response.set_cookie(SESSION_COOKIE, sid, max_age=int(SESSION_SECONDS), httponly=True, samesite="strict",
                            path="/")  # fmt: skip
        return response

    async def logout(self, request: Request) -> Response:
        form = await request.form()
        caller = identify(request, self.sessions)
        if cross_site(request) or not csrf_ok(caller.session, form.get("csrf")):
            return Response("refused\n", status_code=403, media_type="text/plain")
        self.sessions.logout(request.cookies.get(SESSION_COOKIE))
        response = RedirectResponse("/", status_code=303)
        response.delete_cookie(SESSION_COOKIE, path="/", httponly=True, samesite="strict")
        return response

    async def _action_refused(self, request: Request) -> Response | None:
        """None when this POST may act; else the refusal (403 cross-site, no CSRF, no token set; 401 no token)."""
        wants_json = "application/json" in request.headers.get("accept", "") or "authorization" in request.headers

        async def refuse(status: int, text: str) -> Response:
            if wants_json:
                return JSONResponse({"error": text}, status_code=status)
            return await self.render(request, "message.html", status=status, title="Not allowed", messages=[text], ok=False)

        if not self.sessions.enabled:
            return await refuse(403, "Actions are off: no token is configured ([web] token in the dhwatch configuration).")
        if cross_site(request):
            return await refuse(403, "Refused: this request came from another site.")
        caller = identify(request, self.sessions)
        if caller.authenticated and caller.session is None:
            return None  # Authorization: Bearer (a browser never sends it by itself)
        form = await request.form()
        token = form.get("token")
        if isinstance(token, str) and token and self.sessions.token_ok(token):
            return None
        if isinstance(token, str) and token:
            await self._slow_down()
            return await refuse(401, "Wrong token.")
        if caller.session is None:
            return await refuse(401, "The token is required: log in first (/login).")
        if not csrf_ok(caller.session, form.get("csrf")):
            return await refuse(403, "Refused: the form's security code is missing or stale; reload the page and try again.")
        return None

    async def _outcomes(self, request: Request, outcomes: list[Outcome], gone: int = 0) -> Response:
        done = sum(o.ok for o in outcomes)
        if "application/json" in request.headers.get("accept", "") or "authorization" in request.headers:
            return JSONResponse({"retried": done, "gone": gone,
                                 "outcomes": [{"ok": o.ok, "message": o.message} for o in outcomes]},
                                status_code=200 if all(o.ok for o in outcomes) else 409)  # fmt: skip
        messages = [("" if o.ok else "Not retried: ") + o.message for o in outcomes] or ["No failed files to retry."]
        if gone:
            messages.append(f"{gone} failed file(s) are no longer in the failed folder: skipped.")
        if done:
            messages.append("dhwatch takes them again in a few seconds: watch them on the list.")
        return await self.render(request, "message.html", status=200 if all(o.ok for o in outcomes) else 409,
                           title="Retry", messages=messages, ok=all(o.ok for o in outcomes))  # fmt: skip

    def _retried(self, paths: list[str]) -> None:
        for path in paths:
            if self.log is not None:
                self.log.info("web_retry", file=path)
            if self.on_retried is not None:
                self.on_retried(path)

    async def retry(self, request: Request) -> Response:
        if (refused := await self._action_refused(request)) is not None:
            return refused
        file_id = request.path_params["file_id"]
        outcome, path = await self.reader.run(lambda c: actions.retry_one(c, self.settings, file_id))
        self._retried([path] if path is not None else [])
        return await self._outcomes(request, [outcome])

    async def retry_failed(self, request: Request) -> Response:
        if (refused := await self._action_refused(request)) is not None:
            return refused
        outcomes, back, gone = await self.reader.run(lambda c: actions.retry_all_failed(c, self.settings))
        self._retried(back)
        return await self._outcomes(request, outcomes, gone)
