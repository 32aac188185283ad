"""The served Panel dashboard: cached data (``data``), ``param`` state (``state``), one
``Viewer`` per page (``views``), the template (``app``) and ``serve``.

    from keyledger.dashboard import build_app, serve
    serve("~/.keyledger")            # panel serve on http://127.0.0.1:5006, prints the URL

``keyledger`` itself never imports Panel, and neither does ``serve``: it checks the options and
the home, then starts ``panel serve`` in a process of its own. The app's names load Panel (and
Altair) when first used, so ``keyledger dashboard`` refuses a bad option in a fraction of a second.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .serve import serve, serve_command

if TYPE_CHECKING:
    from .app import Dashboard, build_app
    from .state import DashboardState

_LAZY = {"Dashboard": "app", "build_app": "app", "DashboardState": "state"}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        from importlib import import_module

        return getattr(import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["Dashboard", "DashboardState", "build_app", "serve", "serve_command"]
