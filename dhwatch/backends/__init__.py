"""Backends behind one interface (:mod:`dhwatch.backends.base`); chosen by the ``backend`` key
(top level, and a recipe's own ``backend``)."""

from __future__ import annotations

from collections.abc import Iterable

from dhwatch.backends.base import Backend
from dhwatch.config import Settings


def create_backend(settings: Settings, name: str | None = None) -> Backend:
    """A backend, ready to use, built from its own section (``[deephearing]``, ``[local]``,
    ``[deepaffects]``); the top-level one by default."""
    name = name or settings.backend
    if name == "deephearing":
        from dhwatch.backends.deephearing import DeepHearingBackend

        return DeepHearingBackend(settings.deephearing, settings.inbox, settings.deephearing.resolve_api_key)
    if name == "local":
        from dhwatch.backends.local import LocalBackend

        return LocalBackend(settings)
    if name == "deepaffects":
        from dhwatch.backends.deepaffects import DeepAffectsBackend

        da = settings.deepaffects
        return DeepAffectsBackend(da, settings.inbox, settings.state_dir, da.resolve_api_key)
    raise ValueError(f"backend: unknown backend {name!r}")


def create_other_backends(settings: Settings, also: Iterable[str] = ()) -> dict[str, Backend]:
    """Every backend besides the top-level one that the recipes name, or that files still in flight
    were taken with (``also``: a file keeps its backend when the config changes)."""
    names = [n for n in [*settings.backends_in_use(), *sorted(also)] if n != settings.backend]
    return {name: create_backend(settings, name) for name in dict.fromkeys(names)}
