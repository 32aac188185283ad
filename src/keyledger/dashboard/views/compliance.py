"""The Compliance page: heatmap, finding trend, the findings table with its evidence."""

from __future__ import annotations

import json
from typing import Any

import pandas as pd
import panel as pn

from ... import analytics as kla
from ...display import SEVERITY_COLORS
from .base import NoAudit, View
from .widgets import ChartPane, card, table

FINDING_COLUMNS = ["severity", "framework", "control", "rule_id", "title", "key", "version",
                   "principal", "status", "first_seen", "last_seen", "evidence", "remediation"]


class ComplianceView(View):
    title = "Compliance"

    def _build(self) -> list[Any]:
        self.heatmap = ChartPane("compliance_heatmap", "kl-chart-heatmap")
        self.trend_chart = ChartPane("finding_trend", "kl-chart-trend")
        self.findings_table = table(
            "kl-findings-table", page_size=12, full_pages=True, row_content=self._evidence,
            embed_content=False,
            hidden_columns=["evidence", "remediation"], columns=FINDING_COLUMNS,
            color_column="severity", colors=SEVERITY_COLORS)
        self.findings_title = pn.pane.Markdown("#### Findings", margin=(0, 5))
        self.note = pn.pane.Markdown("", css_classes=["kl-compliance-note"])
        self.download = pn.widgets.FileDownload(
            callback=self._report, filename="keyledger-compliance.html",
            label="Download the HTML compliance report", color="primary",
            css_classes=["kl-report-download"], embed=False)
        findings_card = card("", self.note, self.findings_table)
        findings_card[0] = self.findings_title
        return [
            pn.Row(self.download, sizing_mode="stretch_width"),
            pn.Row(card(None, self.heatmap), card(None, self.trend_chart),
                   sizing_mode="stretch_width"),
            findings_card,
        ]

    @staticmethod
    def _evidence(row: pd.Series) -> pn.viewable.Viewable:
        """The drill-down under a finding: its evidence (values and audit seq ids) and fix."""
        try:
            evidence = json.loads(row["evidence"]) if row["evidence"] else {}
        except (TypeError, ValueError):
            evidence = {"evidence": row["evidence"]}
        return pn.Column(
            pn.pane.Markdown(f"**Remediation:** {row.get('remediation') or '-'}"),
            pn.pane.JSON(evidence, depth=2, css_classes=["kl-evidence"]),
            sizing_mode="stretch_width")

    def _report(self) -> str:
        path = self.state.data.compliance_report()
        return str(path)

    def _update(self) -> None:
        st, data = self.state, self.state.data
        if not st.can_read_audit:
            self.download.visible = False
            raise NoAudit()
        kf = st.key_filters()
        findings = data.filtered_findings(kf)
        matrix = data.compliance_matrix(kf)
        trend = data.compliance_trend()
        self.frames.update(findings=findings, matrix=matrix, trend=trend)
        self.heatmap.update(matrix)
        self.trend_chart.update(trend)
        shown = findings[[c for c in FINDING_COLUMNS if c in findings.columns]]
        rank = {s: i for i, s in enumerate(kla.SEVERITY_ORDER)}
        shown = shown.sort_values(["severity", "framework", "rule_id"],
                                  key=lambda s: s.map(rank) if s.name == "severity" else s)
        # a plain frame with plain Python values: Tabulator has been seen to drop every row of
        # the FindingsFrame subclass with pandas' nullable Int64 versions
        shown = pd.DataFrame(shown).reset_index(drop=True)
        shown["version"] = shown["version"].astype(object).where(shown["version"].notna(), None)
        self.findings_table.value = shown
        self.findings_title.object = (f"#### Findings ({len(findings):,} open; click a row's "
                                      "arrow for its evidence)")
        self.note.object = ("" if len(trend) else
                            "*No compliance evaluation is stored yet: download the report (it "
                            "evaluates), or run `keyledger run-due`.*")
