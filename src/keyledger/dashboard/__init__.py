"""The served Panel dashboard: cached data (``data``), ``param`` state (``state``), one
``Viewer`` per page (``views``), the template (``app``) and ``serve``.

    from keyledger.dashboard import build_app, serve
    serve("~/.keyledger")            # panel serve on http://127.0.0.1:5006, prints the URL

Importing this package loads Panel; ``keyledger`` itself never imports it.
"""

from .app import Dashboard, build_app
from .serve import serve, serve_command
from .state import DashboardState

__all__ = ["Dashboard", "DashboardState", "build_app", "serve", "serve_command"]
