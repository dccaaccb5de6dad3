"""The production DeepHearing-compatible service that ``dhwatch serve`` runs (no fault hooks).

- :mod:`dhwatch.service.app` — the API and storage origins as Starlette apps, the job table;
- :mod:`dhwatch.service.forms` — the streaming multipart reader for ``/enhance``;
- :mod:`dhwatch.service.jobs` — job ids, phases, what a processor returns.
"""
