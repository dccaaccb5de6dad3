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
    if settings.backend == "deepaffects":
        from dhwatch.backends.deepaffects import DeepAffectsBackend

        da = settings.deepaffects
        return DeepAffectsBackend(da, settings.inbox, settings.state_dir, da.resolve_api_key)
    raise ValueError(f"backend: unknown backend {settings.backend!r}")
