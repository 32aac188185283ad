"""The Overview page: KPI tiles, keys by state, operations by outcome, rotation status."""

from __future__ import annotations

from typing import Any

import pandas as pd
import panel as pn

from ... import analytics as kla
from ...display import GREEN, RED, SEVERITY_COLORS
from ..data import bucket_for
from .base import View
from .widgets import KPI, ChartPane, arrow, card


class OverviewView(View):
    title = "Overview"

    def _build(self) -> list[Any]:
        self.kpi_keys = KPI("Keys (active of total)", "keys")
        self.kpi_overdue = KPI("Overdue rotations (keys)", "overdue")
        self.kpi_findings = KPI("Open critical/high findings", "findings")
        self.kpi_ops = KPI("Operations, last 24 h (calls)", "ops")
        self.kpi_audit = KPI("Audit verification", "audit", string=True)
        self.states_chart = ChartPane("keys_by_state", "kl-chart-keys-by-state")
        self.ops_chart = ChartPane("operations", "kl-chart-ops-outcome")
        self.rotation_chart = ChartPane("rotation_status", "kl-chart-rotation-overview", top=25)
        return [
            pn.FlexBox(self.kpi_keys, self.kpi_overdue, self.kpi_findings, self.kpi_ops,
                       self.kpi_audit, css_classes=["kl-kpis"]),
            pn.Row(card(None, self.states_chart), card(None, self.ops_chart),
                   sizing_mode="stretch_width"),
            card(None, self.rotation_chart),
        ]

    def _update(self) -> None:
        st, data = self.state, self.state.data
        kf, f = st.key_filters(), st.filters()
        status = data.key_status(kf)
        by_state = kla.keys_by_state(status)
        now = st.now()
        self.frames.update(status=status, by_state=by_state)
        # keys
        active = int((status["state"] == "active").sum())
        new7 = int((status["created_at"] >= pd.Timestamp(now) - pd.Timedelta(days=7)).sum())
        self.kpi_keys.set(active, f"of {len(status):,} keys · {new7:,} created in the last "
                          "7 days")
        # rotations
        overdue = int((status["rotation_status"] == "overdue").sum())
        soon = int((status["rotation_status"] == "due soon").sum())
        self.kpi_overdue.set(overdue, f"{arrow(soon)} more due within 30 days" if soon else
                             "none more due within 30 days",
                             RED if overdue else GREEN)
        self.frames.update(overdue=overdue, due_soon=soon)
        self.states_chart.update(by_state)
        self.rotation_chart.update(status)
        if not st.can_read_audit:
            self.kpi_findings.set(0, "needs the auditor or admin role")
            self.kpi_ops.set(0, "needs the auditor or admin role")
            self.kpi_audit.set("–", "needs the auditor or admin role")
            return
        # findings
        findings = data.filtered_findings(kf)
        severe = findings[findings["severity"].isin(["critical", "high"])]
        new = int((severe["status"] == "new").sum())
        self.kpi_findings.set(len(severe), f"{arrow(new)} new in the last evaluation" if new
                              else "none new in the last evaluation",
                              SEVERITY_COLORS["critical"] if len(severe) else GREEN)
        self.frames.update(findings=findings, severe=len(severe))
        # operations
        numbers = data.overview_numbers(kf)
        act = {k: numbers[k] for k in ("ops", "ops_before", "denied", "failed")}
        change = act["ops"] - act["ops_before"]
        pct = f" ({change / act['ops_before']:+.0%})" if act["ops_before"] else ""
        self.kpi_ops.set(act["ops"], f"{arrow(change, higher_is_worse=False)}{pct} vs the 24 h "
                         f"before · {act['denied']:,} denied · {act['failed']:,} failed")
        self.frames["activity"] = act
        ops = data.ops_per_period(f, by="outcome", bucket=bucket_for(st.time_range))
        self.frames["ops"] = ops
        self.ops_chart.update(ops)
        # audit verification
        ver, total = numbers["verification"], numbers["total"]
        self.frames.update(verification=ver, audit_records=total)
        if ver is None:
            self.kpi_audit.set("never", f"{total:,} records not yet verified", RED)
        else:
            when = pd.Timestamp(ver["time"]).strftime("%Y-%m-%d %H:%M")
            since = max(total - ver["records"], 0)
            ok = ver["ok"]
            self.kpi_audit.set("OK" if ok else "BROKEN",
                               f"{ver['records']:,} records at {when} UTC · "
                               f"{arrow(since)} since", GREEN if ok else RED)
