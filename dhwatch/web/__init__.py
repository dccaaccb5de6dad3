"""The studio's web page (``[web] address``), served by ``dhwatch run`` on the daemon's event loop.

Modules, one responsibility each: :mod:`~dhwatch.web.app` (routes), :mod:`~dhwatch.web.data`
(every SQL query, read-only), :mod:`~dhwatch.web.auth` (token, sessions, CSRF),
:mod:`~dhwatch.web.media` (serving recorded files safely), :mod:`~dhwatch.web.feed` (live
updates), :mod:`~dhwatch.web.actions` (retry), :mod:`~dhwatch.web.templates` (HTML);
``static/`` and ``templates/`` hold the assets. See docs/web.md.
"""
