"""Backends behind one interface (:mod:`dhwatch.backends.base`); chosen by the ``backend`` key."""

from __future__ import annotations

from dhwatch.backends.base import Backend
from dhwatch.config import Settings


def create_backend(settings: Settings) -> Backend:
    """The configured backend, ready to use."""
    if settings.backend == "deephearing":
        from dhwatch.backends.deephearing import DeepHearingBackend

        return DeepHearingBackend(settings.deephearing, settings.inbox, settings.deephearing.resolve_api_key)
    if settings.backend == "local":
        from dhwatch.backends.local import LocalBackend

        return LocalBackend(settings)
    raise ValueError(f"backend: unknown backend {settings.backend!r}")
