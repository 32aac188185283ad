"""Screenshots of every dashboard page for the README: docs/screenshots/<page>.png.

    .venv/bin/python scripts/screenshots.py                 # seeds a demo fleet in a temp dir
    .venv/bin/python scripts/screenshots.py --home demo-home --principal security-lead

Serves ``dashboards/keyledger_dashboard.py`` on 127.0.0.1 (as ``keyledger dashboard`` does),
opens it in Debian's Chromium (/usr/bin/chromium, headless, driven by Playwright; never
``playwright install``) at 1400x900, and saves one PNG per page: Overview, Rotation, Usage,
Compliance, Audit. Without ``--home`` it seeds ``keyledger.demo_fleet.seed_demo`` (40 keys,
6 months: about 20 s) into a temporary folder. Exits 1 if the browser reported console errors
(the PNGs are still written).
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from browser_support import (  # noqa: E402  (tests/ holds the shared harness)
    ADMIN,
    TAB_TITLES,
    DashboardServer,
    PageErrors,
    chromium_available,
    launch_chromium,
)

from keyledger.demo_fleet import DEMO_FILE, SECURITY_LEAD, seed_demo  # noqa: E402

CHART = "svg.marks, canvas.marks"
PAGES_WITH_CHARTS = ("Overview", "Rotation", "Usage", "Compliance")


def seed(home: Path, keys: int, months: int) -> str:
    """Seed ``home``; returns the principal to take the screenshots as."""
    print(f"seeding a demo fleet ({keys} keys, {months} months) into {home} ...", flush=True)
    seed_demo(home, keys=keys, months=months, progress=False)
    return SECURITY_LEAD


def settle(page, title: str) -> None:
    """Wait until the page's container, its charts and its tables are drawn."""
    from playwright.sync_api import TimeoutError as PlaywrightTimeout

    page.locator(f".kl-page-{title.lower()}").locator("visible=true").first.wait_for()
    if title in PAGES_WITH_CHARTS:
        page.locator(CHART).locator("visible=true").first.wait_for()
    rows = page.locator(f".kl-page-{title.lower()} .tabulator-row").locator("visible=true")
    if page.locator(f".kl-page-{title.lower()} .tabulator").count():
        try:
            rows.first.wait_for(timeout=10_000)
        except PlaywrightTimeout:
            print(f"note: no table rows on {title}", flush=True)
    page.wait_for_load_state("networkidle")
    page.wait_for_timeout(1500)  # let Vega and Tabulator finish laying out
    idle(page)


def idle(page, timeout: float = 5.0) -> None:
    """Wait for a moment when the header's busy indicator is not spinning."""
    deadline = time.monotonic() + timeout
    while page.locator(".pn-busy-container .loader.spin").count() and time.monotonic() < deadline:
        page.wait_for_timeout(50)


def shoot(url: str, out: Path, width: int, height: int, full_page: bool) -> list[str]:
    from playwright.sync_api import sync_playwright

    out.mkdir(parents=True, exist_ok=True)
    profile = Path(tempfile.mkdtemp(prefix="kl-shots-chromium-"))
    try:
        with sync_playwright() as pw:
            context = launch_chromium(pw, profile=profile, viewport=(width, height))
            context.set_default_timeout(60_000)
            page = context.new_page()
            errors = PageErrors(page)
            page.goto(url, wait_until="load")
            for title in TAB_TITLES:
                page.locator(".bk-tab").filter(has_text=title).first.click()
                settle(page, title)
                page.mouse.move(0, height - 1)  # no hover effects in the picture
                idle(page)
                path = out / f"{title.lower()}.png"
                page.screenshot(path=str(path), full_page=full_page)
                print(f"wrote {path.relative_to(ROOT) if path.is_relative_to(ROOT) else path}",
                      flush=True)
            context.close()
        return errors.items
    finally:
        shutil.rmtree(profile, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--home", type=Path, help="a seeded home (default: seed a temporary one)")
    parser.add_argument("--principal", help="who to log in as (default: the seeding's admin)")
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "screenshots")
    parser.add_argument("--keys", type=int, default=40, help="demo fleet size when seeding")
    parser.add_argument("--months", type=int, default=6, help="demo history when seeding")
    parser.add_argument("--width", type=int, default=1400)
    parser.add_argument("--height", type=int, default=900)
    parser.add_argument("--full-page", action="store_true", help="whole pages, not the viewport")
    args = parser.parse_args(argv)
    if not chromium_available():
        print("needs Debian's chromium at /usr/bin/chromium (apt-get install chromium)",
              file=sys.stderr)
        return 2
    tmp = None
    home = args.home
    principal = args.principal
    try:
        if home is None:
            tmp = Path(tempfile.mkdtemp(prefix="kl-shots-"))
            home = tmp / "demo-home"
            principal = principal or seed(home, args.keys, args.months)
        elif principal is None:
            principal = SECURITY_LEAD if (home / DEMO_FILE).exists() else ADMIN
        log = (tmp or Path(tempfile.gettempdir())) / "kl-screenshots-server.log"
        started = time.monotonic()
        with DashboardServer(home.absolute(), principal, log) as server:
            print(f"serving {server.url} as {principal} "
                  f"(ready in {time.monotonic() - started:.1f} s)", flush=True)
            errors = shoot(server.url, args.out, args.width, args.height, args.full_page)
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
    for error in errors:
        print(f"browser: {error}", file=sys.stderr)
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
