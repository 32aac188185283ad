"""Installed copy of dashboards/keyledger_dashboard.py, for ``panel serve`` (``keyledger
dashboard`` uses it when the source checkout's dashboards/ folder is not there)."""

from keyledger.dashboard.app import main

if __name__.startswith("bokeh_app") or __name__ == "__main__":
    main()
