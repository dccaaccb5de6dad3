"""Strict local stand-ins for the remote services dhwatch speaks to.

Nothing here reaches a real vendor: each emulator is a real HTTP server on 127.0.0.1 that
speaks the vendor's wire protocol, refuses what the vendor would refuse, and misbehaves on
request (the faults listed in ``shared/API-NOTES.md``), so tests and users exercise the same
code paths the real services would. Everything is test-only: production servers
(``dhwatch serve``, the webhook listener) never import this package.

- :mod:`dhwatch.emulators.httpserver` — an origin: uvicorn (the production stack) serving an
  ASGI app or synchronous routes, with faults and a request log;
- :mod:`dhwatch.emulators.wire` — the fault and logging layer around an origin's app, and the
  uvicorn protocol that hands it the connection (resets, drops, truncated bodies);
- :mod:`dhwatch.emulators.faults`, :mod:`dhwatch.emulators.requestlog` — fault plans, request logs;
- :mod:`dhwatch.emulators.deephearing` — the production DeepHearing service plus faults and
  checkable processors;
- :mod:`dhwatch.emulators.deepaffects` — the DeepAffects async denoise API, calling webhooks back;
- :mod:`dhwatch.emulators.metastudio` — the MetaStudio assessment API and its OBS upload origin.
"""
