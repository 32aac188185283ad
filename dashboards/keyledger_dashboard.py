"""The keyledger dashboard, for ``panel serve`` (or ``keyledger dashboard``, which runs this).

    panel serve dashboards/keyledger_dashboard.py --address 127.0.0.1 --port 5006 \
        --args --home ~/.keyledger --principal alice

The home and principal may also come from KEYLEDGER_HOME and KEYLEDGER_PRINCIPAL; with Panel
authentication on, the principal is the logged-in user. See docs/dashboard.md.
"""

from keyledger.dashboard.app import main

main()
