"""keyledger.notebook.setup(): charts that render with no network (issue: "no chart renders on a
machine without internet").

Altair's default renderer emits HTML that loads Vega from cdn.jsdelivr.net; on an air-gapped
machine every chart fails. These tests check, without a browser, that after ``setup()`` (or
implicitly, through the widgets and ``import keyledger.charts`` in a kernel) a chart's output is
drawn in the kernel (SVG/PNG by vl-convert) or is the JupyterChart widget with Vega's JavaScript
inlined, and that HTML exported by nbconvert from an executed notebook holds the chart SVG and
loads nothing for it from a CDN. tests/test_jupyterlab_browser.py checks the same in JupyterLab.
"""

from __future__ import annotations

import base64
import json
import os
import re
import sys
from pathlib import Path

import altair as alt
import ipywidgets as W
import nbformat
import pandas as pd
import pytest

import keyledger as kl
import keyledger.charts as klc
import keyledger.notebook as kn
from keyledger import analytics as ka
from keyledger.widgets._common import show_object

CDN = re.compile(r"cdn\.jsdelivr\.net|esm\.sh|unpkg\.com|vegaEmbed|vega@\d", re.I)
FINDINGS = pd.DataFrame({"framework": ["PCI DSS v4.0", "NIST SP 800-57", "NIST SP 800-57"],
                         "severity": ["critical", "high", "high"]})


@pytest.fixture(autouse=True)
def altair_default_renderer():
    """Each test starts from Altair's own default (the CDN one) and leaves it that way."""
    alt.renderers.enable("default")
    yield
    alt.renderers.enable("default")


def heatmap() -> alt.TopLevelMixin:
    return klc.compliance_heatmap(ka.compliance_matrix(FINDINGS))


def bundle(chart: alt.TopLevelMixin) -> tuple[dict, dict]:
    result = chart._repr_mimebundle_()
    return (dict(result[0]), dict(result[1])) if isinstance(result, tuple) else (dict(result), {})


def test_altair_default_loads_vega_from_a_cdn() -> None:
    """The failure the issue reports, so the tests below mean something."""
    data, _ = bundle(heatmap())
    assert CDN.search(data["text/html"])


def test_setup_draws_charts_as_svg_in_the_kernel_with_no_cdn() -> None:
    assert kn.setup() == "svg"
    assert kn.active_renderer() == "svg"
    data, _ = bundle(heatmap())
    assert set(data) == {"image/svg+xml", "text/plain"}
    svg = data["image/svg+xml"]
    assert svg.lstrip().startswith("<svg") and "</svg>" in svg
    assert "PCI DSS v4.0" in svg and "critical" in svg  # the chart's own labels, drawn
    assert not CDN.search(json.dumps(data))
    assert data["text/plain"] == "<keyledger chart: Open findings by framework and severity>"


def test_setup_png_is_an_image_at_twice_the_size() -> None:
    assert kn.setup("png") == "png"
    data, meta = bundle(heatmap())
    assert data["image/png"][:8] == b"\x89PNG\r\n\x1a\n"
    assert meta["image/png"]["width"] > 100


def test_setup_interactive_is_the_widget_with_vega_inlined_and_the_svg_beside_it() -> None:
    assert kn.setup("interactive") == "interactive"
    data, _ = bundle(heatmap())
    assert "application/vnd.jupyter.widget-view+json" in data
    assert data["image/svg+xml"].lstrip().startswith("<svg")  # for exporters without widgets
    from altair import JupyterChart

    assert JupyterChart._is_offline
    assert "esm.sh" not in JupyterChart._esm and len(JupyterChart._esm) > 100_000


def test_an_unknown_renderer_is_refused_and_nothing_changes() -> None:
    kn.setup()
    with pytest.raises(kl.InvalidInput, match="svg, png, interactive"):
        kn.setup("vega-cdn")
    assert kn.active_renderer() == "svg"


def test_ensure_setup_replaces_network_renderers_and_keeps_a_choice_made_by_hand() -> None:
    for network in ("default", "mimetype", "html"):
        alt.renderers.enable(network)
        assert kn.ensure_setup() == "svg"
        assert alt.renderers.active == "keyledger"
    kn.setup("png")
    assert kn.ensure_setup() == "png"  # already offline: unchanged
    alt.renderers.enable("svg")  # Altair's own SVG renderer, chosen by hand
    assert kn.ensure_setup() is None
    assert alt.renderers.active == "svg"


def test_the_widgets_draw_their_chart_offline_without_setup() -> None:
    """ComplianceView's heat map goes through show_object, which calls ensure_setup()."""
    out = W.Output()
    show_object(out, heatmap())
    (output,) = out.outputs
    assert "image/svg+xml" in output["data"]
    assert not CDN.search(json.dumps(output["data"]))


def test_in_kernel_is_false_outside_a_kernel() -> None:
    assert kn.in_kernel() is False


# -- an executed notebook, exported to HTML ---------------------------------------------------------
CELLS = [
    "import altair as alt\nimport pandas as pd\nimport keyledger.charts as klc",  # no setup()
    "alt.Chart(pd.DataFrame({'day': ['mon', 'tue'], 'calls': [3, 5]}), title='calls per day')"
    ".mark_bar().encode(x='day', y='calls')",
    "import keyledger.notebook\nkeyledger.notebook.setup()\n"
    "klc.no_data('nothing to show yet')",
    # DuckDB turns its progress bar on inside a kernel; keyledger's connections turn it off
    "import os, tempfile, duckdb, keyledger as kl\n"
    "print('duckdb default:', duckdb.connect().execute("
    "\"SELECT current_setting('enable_progress_bar')\").fetchone()[0])\n"
    "with kl.open(os.path.join(tempfile.mkdtemp(), 'home'), principal='alice') as led:\n"
    "    print('keyledger:', led.query(\"SELECT current_setting('enable_progress_bar') AS p\")"
    "['p'].iloc[0])",
]


@pytest.fixture(scope="module")
def executed_html(tmp_path_factory) -> tuple[nbformat.NotebookNode, str]:
    """A three-cell notebook run on a kernel of this interpreter, then nbconvert's HTML."""
    nbconvert = pytest.importorskip("nbconvert")
    from nbclient import NotebookClient
    from test_notebooks import _kernel_manager

    tmp = tmp_path_factory.mktemp("export")
    nb = nbformat.v4.new_notebook(metadata={"kernelspec": {"name": "python3",
                                                           "display_name": "Python 3"}})
    nb.cells = [nbformat.v4.new_code_cell(src, id=f"c{i}") for i, src in enumerate(CELLS)]
    env = {k: v for k, v in os.environ.items() if k not in ("KEYLEDGER_HOME", "SOFTHSM2_CONF")}
    NotebookClient(nb, km=_kernel_manager(tmp / "kernels"), timeout=120,
                   resources={"metadata": {"path": str(tmp)}}).execute(env={**env,
                                                                            "TMPDIR": str(tmp)})
    html, _ = nbconvert.HTMLExporter().from_notebook_node(nb)
    (tmp / "export.html").write_text(html)
    return nb, html


def test_import_charts_in_a_kernel_makes_charts_offline(executed_html) -> None:
    nb, _ = executed_html
    (output,) = nb.cells[1].outputs
    assert "image/svg+xml" in output["data"] and "text/html" not in output["data"]
    assert "calls per day" in output["data"]["image/svg+xml"]


def test_duckdb_progress_bar_is_off_on_keyledger_connections_in_a_kernel(executed_html) -> None:
    nb, _ = executed_html
    printed = "".join(o.get("text", "") for o in nb.cells[3].outputs)
    assert "duckdb default: True" in printed  # what would leak into outputs
    assert "keyledger: False" in printed


def test_exported_html_keeps_the_charts_and_loads_none_from_a_cdn(executed_html) -> None:
    _, html = executed_html
    # nbconvert embeds each SVG output as a data: URI image, inside the page itself
    svgs = [base64.b64decode(b).decode() for b in
            re.findall(r'<img [^>]*src="data:image/svg\+xml;base64,([^"]+)"', html)]
    assert len(svgs) == 2 and all(s.lstrip().startswith("<svg") for s in svgs)
    assert "calls per day" in svgs[0] and "nothing to show yet" in svgs[1]
    scripts = re.findall(r"<script[^>]*src=[\"']([^\"']+)", html)
    assert not [s for s in scripts if CDN.search(s)]
    assert not CDN.search(html)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(pytest.main([str(Path(__file__))]))
