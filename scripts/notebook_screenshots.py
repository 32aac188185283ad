#!/usr/bin/env python3
"""Screenshots of the morning notebook in JupyterLab, light and dark, for docs/notebooks.md.

    python scripts/notebook_screenshots.py DEMO_HOME [--out docs/screenshots]

Starts JupyterLab on 127.0.0.1 (tests/jupyterlab_support.py: own config, no network) on a copy
of the notebooks with ``KEYLEDGER_HOME=DEMO_HOME`` (a demo estate: ``keyledger demo --home
DEMO_HOME``; the notebook rotates one key in it), runs notebook 04 in Debian's headless
Chromium and writes ``notebook-morning-light.png`` (overdue keys and their chart) and
``notebook-morning-grid.png`` (the key grid with the selected key's details beside it) and
``notebook-morning-dark.png`` (findings in the compliance view, JupyterLab Dark).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from browser_support import launch_chromium, remove_profile  # noqa: E402
from jupyterlab_support import (  # noqa: E402
    LabServer,
    OffMachine,
    copy_notebooks,
    finish_run_all,
    open_notebooks,
    set_theme,
    start_run_all,
    wait_for_app,
    wait_for_charts,
)

MORNING = "04-security-engineers-morning.ipynb"
# name -> (the cell the screenshot starts at, dark theme?)
SHOTS = {"light": ("04-03", False), "grid": ("04-05", False), "dark": ("04-09", True)}
SCROLL_TO = """([p, id]) => {
    const nb = window.__kl[p].widget.content;
    const cell = nb.widgets.find(c => c.model.id === id);
    nb.node.scrollTop = 0;
    cell.node.scrollIntoView({block: 'start'});
}"""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("home", type=Path, help="a demo home (keyledger demo --home ...)")
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "screenshots")
    args = parser.parse_args(argv)
    if not (args.home / "demo.json").is_file():
        parser.error(f"{args.home} is not a demo home: run `keyledger demo --home {args.home}`")
    from playwright.sync_api import sync_playwright

    tmp = Path(tempfile.mkdtemp(prefix="kl-nb-shots-"))
    copy_notebooks(tmp / "root")
    server = LabServer(tmp / "root", tmp / "lab",
                       env={"KEYLEDGER_HOME": str(args.home.resolve())})
    args.out.mkdir(parents=True, exist_ok=True)
    try:
        server.start()
        with sync_playwright() as p:
            context = launch_chromium(p, profile=tmp / "chromium", viewport=(1400, 1000))
            network = OffMachine(context)
            page = context.pages[0] if context.pages else context.new_page()
            page.goto(server.url("lab"), wait_until="domcontentloaded", timeout=120_000)
            wait_for_app(page)
            execute = "async () => { await window.jupyterapp.commands.execute("
            page.evaluate(execute + "'application:toggle-left-area'); }")
            open_notebooks(page, [MORNING])
            start_run_all(page, MORNING)
            finish_run_all(page, MORNING)
            wait_for_charts(page, MORNING, 5)
            for theme, (cell, dark) in SHOTS.items():
                set_theme(page, dark=dark)
                page.evaluate(SCROLL_TO, [MORNING, cell])
                if theme == "grid":  # a clicked row: its details beside the grid
                    page.locator(".kl-grid tbody tr").first.click()
                page.wait_for_timeout(1500)  # the theme's CSS and the images settle
                path = args.out / f"notebook-morning-{theme}.png"
                page.screenshot(path=str(path))
                print(f"wrote {path}")
            context.close()
            if network.off_machine():
                print("requests off the machine:", network.off_machine(), file=sys.stderr)
                return 1
    finally:
        server.stop()
        remove_profile(tmp / "chromium")
    return 0


if __name__ == "__main__":
    sys.exit(main())
