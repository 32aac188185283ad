"""The notebooks in a real JupyterLab, in headless Chromium, with no way off the machine.

One ``jupyter lab`` (tests/jupyterlab_support.py) serves copies of the four notebooks on
127.0.0.1; Playwright drives Debian's Chromium (never ``playwright install``) with every request
that would leave the machine aborted and recorded, as on an air-gapped desk. Each notebook is
opened and run with "Run All Cells"; then every chart output must have drawn (an SVG image from
``keyledger.notebook.setup()``, or Vega's canvas/SVG in the interactive widget) and no request
may have gone anywhere but 127.0.0.1. Notebook 04 opens a small demo estate seeded while the
others run. A last, test-only notebook shows the interactive renderer and Panel (a pane and the
keyledger dashboard, ``build_app``) inside the notebook, offline. In notebook 04 the
``dashboard()`` Keys tab is measured at laptop size (1280x900, file browser open) and one row of
its key grid is clicked.
"""

from __future__ import annotations

import json
import time
from concurrent.futures import ThreadPoolExecutor

import nbformat
import pytest
from browser_support import PageErrors, chromium_available, launch_chromium, remove_profile
from jupyterlab_support import (
    CHART_REPORT,
    LabServer,
    OffMachine,
    activate,
    chart_report,
    check_key_grid,
    close_notebook,
    copy_notebooks,
    copy_small_demo,
    finish_run_all,
    open_notebooks,
    run_cache,
    start_run_all,
    wait_for_app,
    wait_for_charts,
)

pytestmark = pytest.mark.skipif(
    not chromium_available(),
    reason="Debian chromium (/usr/bin/chromium) is not installed: apt-get install chromium "
           "(never `playwright install`)")

# chart outputs each notebook draws: cells' charts + the heat map inside a ComplianceView
EXPECTED_CHARTS = {
    "01-quickstart.ipynb": 0,
    "02-rotation-and-compliance.ipynb": 5,   # 4 cells + dashboard()'s compliance heat map
    "03-audit-analytics.ipynb": 5,
    "04-security-engineers-morning.ipynb": 5,  # 3 cells + ComplianceView's + dashboard's heat map
}
EXTRAS = "05-offline-extras.ipynb"
EXTRA_CELLS = [
    # the interactive renderer: Altair's JupyterChart widget, Vega's JS sent by the kernel
    """import altair as alt
import pandas as pd
import keyledger.notebook
keyledger.notebook.setup("interactive")
alt.Chart(pd.DataFrame({"day": ["mon", "tue", "wed"], "calls": [3, 5, 2]}),
          title="interactive offline").mark_bar().encode(x="day", y="calls", tooltip=["calls"])""",
    # Panel inside the notebook: BokehJS and Panel's JS from the kernel, not a CDN
    """import keyledger.notebook
keyledger.notebook.setup()
import panel as pn
keyledger.notebook.panel_extension()""",
    """pn.Column(pn.pane.Markdown("## panel-offline-marker"), pn.widgets.Button(name="offline"))""",
    """import os
from keyledger.dashboard.app import build_app
app = build_app(os.environ["KEYLEDGER_HOME"], principal="audit-anna")
app.main[0]  # the dashboard's pages (Overview first), inside the notebook""",
]


@pytest.fixture(scope="module")
def lab_session(tmp_path_factory):
    """Run every notebook once in one Lab; returns what each showed and what the page fetched."""
    pytest.importorskip("jupyterlab")
    pytest.importorskip("playwright.sync_api")
    from playwright.sync_api import sync_playwright

    tmp = tmp_path_factory.mktemp("jupyterlab")
    root = tmp / "root"
    names = copy_notebooks(root)
    demo = tmp / "demo-home"
    seeder = ThreadPoolExecutor(1)  # the demo estate is copied (or seeded) while Lab starts
    seeding = seeder.submit(copy_small_demo, demo, run_cache(tmp_path_factory.getbasetemp())
                            / "small-demo", tmp / "seed.log")
    extras = nbformat.v4.new_notebook(metadata=nbformat.read(
        root / names[0], as_version=4).metadata)
    extras.cells = [nbformat.v4.new_code_cell(src, id=f"extra-{i}")
                    for i, src in enumerate(EXTRA_CELLS)]
    nbformat.write(extras, root / EXTRAS)
    (tmp / "tmp").mkdir()
    server = LabServer(root, tmp / "lab", env={"KEYLEDGER_HOME": str(demo),
                                               "TMPDIR": str(tmp / "tmp")})
    profile = tmp / "chromium"
    results: dict = {"notebooks": {}, "steps": []}
    started = time.monotonic()

    def step(what: str) -> None:  # where the time goes, kept in results.json
        results["steps"].append(f"{time.monotonic() - started:6.1f} s  {what}")

    try:
        server.start()
        step("lab answers")
        with sync_playwright() as p:
            context = launch_chromium(p, profile=profile, viewport=(1400, 1000))
            network = OffMachine(context)
            page = context.pages[0] if context.pages else context.new_page()
            errors = PageErrors(page)
            page.goto(server.url("lab"), wait_until="domcontentloaded", timeout=120_000)
            wait_for_app(page)
            step("lab page loaded")
            try:
                run_each(page, [*names, EXTRAS], seeding, tmp, step, results)
            except BaseException:
                page.screenshot(path=str(tmp / "failure.png"))
                (tmp / "results.json").write_text(json.dumps(results, indent=1, default=str))
                raise
            results["off_machine"] = network.off_machine()
            results["requests"] = len(network.urls)
            results["page_errors"] = list(errors.items)
            context.close()
    finally:
        server.stop()
        seeder.shutdown(wait=False)
        remove_profile(profile)
    results["server_log"] = server.read_log()
    (tmp / "results.json").write_text(json.dumps(results, indent=1, default=str))
    return results


def run_each(page, names: list[str], seeding, tmp, step, results: dict) -> None:
    """Run All in 01-03 at once (one kernel each); when the demo estate is seeded, in 04 and
    the extras too; then, per notebook, wait for the end, check its charts drew, close it."""
    fresh = [n for n in names if n in EXPECTED_CHARTS and not n.startswith("04")]
    on_demo = [n for n in names if n not in fresh]
    open_notebooks(page, fresh)
    for name in fresh:
        start_run_all(page, name)
    step("01-03 running")
    seeding.result(timeout=600)  # 04 and the extras open the demo estate
    step("demo estate seeded")
    open_notebooks(page, on_demo)
    for name in on_demo:
        start_run_all(page, name)
    for name in names:
        cells = finish_run_all(page, name)
        activate(page, name)
        expected = EXPECTED_CHARTS.get(name, 1)
        report = wait_for_charts(page, name, expected) if expected else chart_report(page, name)
        if name == EXTRAS:  # Panel draws after its models arrive: until the dashboard's chart
            page.wait_for_function(f"p => ({CHART_REPORT})(p).panel_charts.some(c => c.drawn)",
                                   arg=name, timeout=60_000)
            report = chart_report(page, name)
        results["notebooks"][name] = {"cells": cells, **report}
        if name.startswith("04"):  # its dashboard(): the key grid at laptop size
            results["grid"] = check_key_grid(page, name)
            step("04 key grid checked")
        close_notebook(page, name)
        step(f"{name} ran")


@pytest.mark.parametrize("name", list(EXPECTED_CHARTS))
def test_each_notebook_runs_all_cells_in_jupyterlab(lab_session, name: str) -> None:
    cells = lab_session["notebooks"][name]["cells"]
    assert cells, f"{name}: no code cells ran"
    assert [c for c in cells if c["errors"]] == []
    assert all(c["count"] for c in cells), f"{name}: cells that did not run: " + str(
        [c["id"] for c in cells if not c["count"]])


@pytest.mark.parametrize("name", [n for n, count in EXPECTED_CHARTS.items() if count])
def test_every_chart_output_draws_with_no_network(lab_session, name: str) -> None:
    charts = lab_session["notebooks"][name]["charts"]
    assert len(charts) == EXPECTED_CHARTS[name], charts
    assert all(c["drawn"] and c["width"] > 100 for c in charts), charts
    assert "Error loading script" not in lab_session["notebooks"][name]["text"]


def test_the_morning_notebook_walks_the_demo_estate(lab_session) -> None:
    text = lab_session["notebooks"]["04-security-engineers-morning.ipynb"]["text"]
    assert "as security-lead" in text and "overdue" in text
    assert "rotated '" in text  # the one rotation, done through the actions widget
    assert "Open findings" in text or "open findings" in text


def test_interactive_renderer_and_panel_render_offline_in_the_notebook(lab_session) -> None:
    extras = lab_session["notebooks"][EXTRAS]
    assert [c for c in extras["cells"] if c["errors"]] == []
    assert [c["mime"] for c in extras["charts"]] == ["vega-embed"]  # Altair's widget
    assert extras["charts"][0]["drawn"], extras["charts"]
    assert "panel-offline-marker" in extras["text"]
    assert "Overdue rotations" in extras["text"] and "Audit verification" in extras["text"]
    assert any(c["drawn"] for c in extras["panel_charts"]), extras["panel_charts"]


def test_the_key_grid_fits_a_laptop_and_selects_by_click(lab_session) -> None:
    """Issue 15: at 1280x900 with the file browser open the key table was a 5,333 px box with
    rows wrapping to 2-3 lines, 3,200 px from the Rotate button, and rows did not click."""
    grid = lab_session["grid"]
    assert grid["viewport"] == [1280, 900] and grid["left_panel_open"], grid
    assert grid["rows"] >= 15 and grid["scrolls"]["down"] and grid["sticky_header"], grid
    assert grid["row_height"] == grid["max_row_height"] < 2 * grid["line_height"], grid  # 1 line
    assert 200 <= grid["grid_box"]["height"] <= 400, grid  # a fixed box, not the whole table
    assert 0 < grid["rotate_below_grid_top"] < grid["viewport"][1], grid
    assert grid["click_selected"], grid


def test_no_request_leaves_the_machine(lab_session) -> None:
    assert lab_session["requests"] > 50  # the page did load through the recorder
    assert lab_session["off_machine"] == []


def test_no_page_errors_or_server_tracebacks(lab_session) -> None:
    errors = [e for e in lab_session["page_errors"] if "favicon" not in e]
    assert errors == []
    assert "Traceback" not in lab_session["server_log"]
