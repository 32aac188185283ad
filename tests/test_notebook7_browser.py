"""A notebook in Jupyter Notebook 7, in headless Chromium, with no way off the machine.

JupyterLab is covered by tests/test_jupyterlab_browser.py; Notebook 7 is a different front end
(its own pages and shell), so the offline promise is checked there too: ``jupyter notebook``
serves a copy of notebook 02 (its charts and ``dashboard()``'s compliance heat map) and a small
notebook with the interactive renderer, each run with "Run All Cells" in its own page. Every
chart output must have drawn and no request may have left 127.0.0.1.
"""

from __future__ import annotations

import json
import shutil

import nbformat
import pytest
from browser_support import PageErrors, chromium_available, launch_chromium, remove_profile
from jupyterlab_support import CHART_REPORT, NOTEBOOKS, LabServer, OffMachine

pytestmark = pytest.mark.skipif(
    not chromium_available(),
    reason="Debian chromium (/usr/bin/chromium) is not installed: apt-get install chromium "
           "(never `playwright install`)")

ROTATION = "02-rotation-and-compliance.ipynb"
INTERACTIVE = "interactive.ipynb"
INTERACTIVE_CELLS = [
    """import altair as alt
import pandas as pd
import keyledger.notebook
keyledger.notebook.setup("interactive")
alt.Chart(pd.DataFrame({"day": ["mon", "tue", "wed"], "calls": [3, 5, 2]}),
          title="interactive offline").mark_bar().encode(x="day", y="calls")""",
    """keyledger.notebook.setup()  # back to the default: SVG drawn in the kernel
alt.Chart(pd.DataFrame({"x": [1, 2, 3], "y": [2, 1, 3]})).mark_line().encode(x="x", y="y")""",
]
BLANK = "blank.ipynb"  # what Notebook 7 itself logs on a page with no keyledger in it
# chart outputs each notebook draws (see EXPECTED_CHARTS in test_jupyterlab_browser.py)
EXPECTED = {BLANK: 0, ROTATION: 5, INTERACTIVE: 2}


class NotebookServer(LabServer):
    """``jupyter notebook`` (Notebook 7) with the harness's isolated folders and token."""

    # Notebook 7's pages never call Panel's preview handlers, whose extension imports Panel
    # into the server (a server start ~4 -> ~1.8 s of CPU); Panel in a notebook is drawn from
    # the kernel, inline
    unused_extensions = ("jupyter_server_terminals", "panel.io.jupyter_server_extension")

    def command(self) -> list[str]:
        lab = super().command()
        assert lab[1:3] == ["-m", "jupyterlab"]
        keep = [a for a in lab[3:] if not a.startswith("--LabApp.")]
        return [lab[0], "-m", "notebook", *keep,
                "--JupyterNotebookApp.expose_app_in_browser=True"]


# Notebook 7 shows one notebook per page: its shell's current widget is the notebook panel.
PANEL_READY = """() => {
    const w = window.jupyterapp && window.jupyterapp.shell && window.jupyterapp.shell.currentWidget;
    const c = w && w.sessionContext;
    return !!(w && w.content && c && c.session && c.session.kernel)
        && c.kernelDisplayStatus === 'idle';
}"""
RUN_ALL = """async () => {
    const w = window.jupyterapp.shell.currentWidget;
    window.__kl = {nb: {widget: w, result: undefined}};
    try { await window.jupyterapp.commands.execute('notebook:run-all-cells');
          window.__kl.nb.result = 'done'; }
    catch (e) { window.__kl.nb.result = 'failed: ' + e; }
}"""
ERRORS = """() => {
    const cells = window.__kl.nb.widget.content.model.cells, out = [];
    for (let i = 0; i < cells.length; i++) {
        const c = cells.get(i);
        if (c.type !== 'code') continue;
        out.push({count: c.executionCount, errors: c.outputs.toJSON()
            .filter(o => o.output_type === 'error').map(o => `${o.ename}: ${o.evalue}`)});
    }
    return out;
}"""


def run_in_page(page, url: str, expected: int) -> dict:
    page.goto(url, wait_until="domcontentloaded", timeout=120_000)
    page.wait_for_function(PANEL_READY, timeout=120_000)
    page.evaluate(RUN_ALL)
    page.wait_for_function("() => window.__kl.nb.result !== undefined", timeout=300_000)
    page.wait_for_function(PANEL_READY, timeout=300_000)
    page.wait_for_function(
        f"""() => {{ const r = ({CHART_REPORT})('nb');
                    return r.charts.length >= {expected} && r.charts.every(c => c.drawn); }}""",
        timeout=60_000)
    return {"result": page.evaluate("() => window.__kl.nb.result"),
            "cells": page.evaluate(ERRORS), **page.evaluate(CHART_REPORT, "nb")}


@pytest.fixture(scope="module")
def notebook7(tmp_path_factory):
    pytest.importorskip("notebook")
    pytest.importorskip("playwright.sync_api")
    from playwright.sync_api import sync_playwright

    tmp = tmp_path_factory.mktemp("notebook7")
    root = tmp / "root"
    root.mkdir()
    shutil.copy(NOTEBOOKS / ROTATION, root / ROTATION)
    extra = nbformat.v4.new_notebook(metadata=nbformat.read(root / ROTATION, as_version=4).metadata)
    extra.cells = [nbformat.v4.new_code_cell(src, id=f"cell-{i}")
                   for i, src in enumerate(INTERACTIVE_CELLS)]
    nbformat.write(extra, root / INTERACTIVE)
    extra.cells = [nbformat.v4.new_code_cell("1 + 1", id="cell-0")]
    nbformat.write(extra, root / BLANK)
    (tmp / "tmp").mkdir()
    server = NotebookServer(root, tmp / "server", env={"TMPDIR": str(tmp / "tmp")})
    profile = tmp / "chromium"
    results: dict = {"notebooks": {}}
    try:
        server.start()
        with sync_playwright() as p:
            context = launch_chromium(p, profile=profile, viewport=(1280, 900))
            network = OffMachine(context)
            page = context.pages[0] if context.pages else context.new_page()
            errors = PageErrors(page)
            for name, expected in EXPECTED.items():
                seen = len(errors.items)
                try:
                    results["notebooks"][name] = run_in_page(
                        page, server.url(f"notebooks/{name}"), expected)
                except BaseException:
                    page.screenshot(path=str(tmp / f"failure-{name}.png"))
                    raise
                results["notebooks"][name]["page_errors"] = errors.items[seen:]
            results["off_machine"] = network.off_machine()
            results["requests"] = len(network.urls)
            context.close()
    finally:
        server.stop()
        remove_profile(profile)
    results["server_log"] = server.read_log()
    (tmp / "results.json").write_text(json.dumps(results, indent=1, default=str))
    return results


@pytest.mark.parametrize("name", [ROTATION, INTERACTIVE])
def test_notebook_runs_and_every_chart_draws_in_notebook7(notebook7, name: str) -> None:
    shown = notebook7["notebooks"][name]
    assert shown["result"] == "done"
    assert shown["cells"] and all(c["count"] for c in shown["cells"]), shown["cells"]
    assert [c for c in shown["cells"] if c["errors"]] == []
    assert len(shown["charts"]) == EXPECTED[name], shown["charts"]
    assert all(c["drawn"] and c["width"] > 100 for c in shown["charts"]), shown["charts"]
    assert "Error loading script" not in shown["text"]


def test_the_interactive_renderer_is_vega_drawn_in_the_page(notebook7) -> None:
    mimes = [c["mime"] for c in notebook7["notebooks"][INTERACTIVE]["charts"]]
    assert sorted(mimes) == ["image/svg+xml", "vega-embed"]


def test_no_request_leaves_the_machine_in_notebook7(notebook7) -> None:
    assert notebook7["requests"] > 20  # the pages did load through the recorder
    assert notebook7["off_machine"] == []
    # Notebook 7.6 itself logs a settings error on every page (the blank notebook shows it);
    # keyledger's notebooks may add none of their own
    own = set(notebook7["notebooks"][BLANK]["page_errors"])
    for name in (ROTATION, INTERACTIVE):
        added = [e for e in notebook7["notebooks"][name]["page_errors"]
                 if e not in own and "favicon" not in e]
        assert added == [], name
    assert "Traceback" not in notebook7["server_log"]
