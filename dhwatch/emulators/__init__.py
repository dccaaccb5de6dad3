"""Strict local stand-ins for the remote services dhwatch speaks to.

Nothing here reaches a real vendor: each emulator is a real HTTP server on 127.0.0.1 that
speaks the vendor's wire protocol, refuses what the vendor would refuse, and misbehaves on
request (the faults listed in ``shared/API-NOTES.md``), so tests and users exercise the same
code paths the real services would.

- :mod:`dhwatch.emulators.httpserver` — the shared plumbing: threaded HTTP/1.1 server,
  request log, fault plan.
- :mod:`dhwatch.emulators.deephearing` — the DeepHearing API plus its result-storage origin.
- :mod:`dhwatch.emulators.deepaffects` — the DeepAffects async denoise API, calling webhooks back.
"""
