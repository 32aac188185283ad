"""The Usage page: operations grouped by a facet, version usage, top keys, unusual activity."""

from __future__ import annotations

from typing import Any

import panel as pn
import param

from ..data import bucket_for
from .base import NoAudit, View
from .widgets import ChartPane, card, table


class UsageView(View):
    title = "Usage"

    group_by: param.Selector[str] = param.Selector(
        default="action", objects=["action", "key", "principal", "outcome"])

    def _build(self) -> list[Any]:
        self.by = pn.widgets.RadioButtonGroup.from_param(self.param.group_by, label="Group by",
                                                          css_classes=["kl-usage-by"])
        self.param.watch(self._changed, "group_by")
        self.ops_chart = ChartPane("operations", "kl-chart-ops")
        self.ops_title = pn.pane.Markdown("", margin=(0, 5))
        self.version_chart = ChartPane("version_usage", "kl-chart-version-usage", top=40)
        self.old_versions = table("kl-old-versions-table", page_size=8)
        self.top_chart = ChartPane("top_keys", "kl-chart-top-keys")
        self.unusual_table = table("kl-unusual-table", page_size=10)
        return [
            card(None, pn.Row(pn.pane.Markdown("**Group operations by**", margin=(12, 5)),
                              self.by, self.ops_title), self.ops_chart),
            pn.Row(card(None, self.version_chart),
                   card("Old versions still decrypting in range (calls; retire only at 0)",
                        self.old_versions),
                   sizing_mode="stretch_width"),
            pn.Row(card(None, self.top_chart),
                   card("Unusual activity, last 7 days (new principal on a key, spikes)",
                        self.unusual_table),
                   sizing_mode="stretch_width"),
        ]

    def _update(self) -> None:
        st, data = self.state, self.state.data
        if not st.can_read_audit:
            raise NoAudit()
        f = st.filters()
        ops = data.ops_per_period(f, by=self.group_by, bucket=bucket_for(st.time_range))
        bucket = ops.attrs.get("bucket", "day")
        self.ops_title.object = f"calls per {bucket}, {st.time_range.lower()}"
        self.ops_chart.update(ops)
        usage = data.version_usage(f)
        self.version_chart.update(usage)
        old = usage[~usage["current"].astype(bool) & (usage["decryptions"] > 0)]
        self.old_versions.value = old.sort_values("decryptions", ascending=False)
        top = data.top_keys(f)
        self.top_chart.update(top)
        unusual = data.unusual_activity(st.key_filters())
        self.unusual_table.value = unusual
        self.frames.update(ops=ops, version_usage=usage, old_versions=old, top_keys=top,
                           unusual=unusual)
