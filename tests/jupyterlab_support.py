"""Harness for the JupyterLab browser test (and scripts/notebook_screenshots.py).

- ``LabServer``: ``jupyter lab`` on 127.0.0.1 and a free port as a subprocess of this interpreter,
  with its own config, data and runtime folders (no settings, workspaces or kernelspecs of the
  machine's user), a token, no update check and no news feed; the kernels it starts run this
  interpreter (the venv) and inherit ``env`` (``KEYLEDGER_HOME``, ``TMPDIR``, ``PYTHONPATH``).
- ``OffMachine``: records every request a browser context makes and aborts those that leave the
  machine (anything but 127.0.0.1/localhost, data: and blob:), like an air-gapped desk.
- ``open_notebooks`` / ``start_run_all`` / ``finish_run_all`` / ``wait_for_charts``: drive
  notebooks through the Lab app object (``--LabApp.expose_app_in_browser``) with the Run menu's
  "Run All Cells" command; several run at once (each has its own kernel), one Lab page.
- ``seed_small_demo(home)``: a small demo estate (20 keys, 2 months) in a subprocess;
  ``copy_small_demo(dest, cache)``: a copy of the one such estate a test run seeds (every module
  that needs it shares the seeding, ~40 s of CPU).
"""

from __future__ import annotations

import fcntl
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, ClassVar
from urllib.parse import urlsplit

from browser_support import free_port

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = ROOT / "notebooks"
LOCAL_HOSTS = {"127.0.0.1", "localhost", "[::1]", "::1"}
LOCAL_SCHEMES = {"data", "blob", "about", "chrome-extension", "devtools"}
# Lab plugins that would reach out: the news feed (asks first, then fetches jupyter.org);
# and the debugger, whose state restore logs an error when a kernel is shut down mid-request.
DISABLED_PLUGINS = {"@jupyterlab/apputils-extension:announcements": True,
                    "@jupyterlab/debugger-extension": True}
# Server extensions the venv enables that a Lab page never calls: terminals (switched off
# anyway) and Notebook 7's pages. (Lab's Panel extension asks the server for
# /panel-preview/layout/<notebook>, and every page for /lsp/status: those stay.)
UNUSED_SERVER_EXTENSIONS = ("jupyter_server_terminals", "notebook")
# Lab's autosave (every 120 s) may save a notebook while the test's own save of it is under
# way; the second save then finds the file changed on disk and Lab asks what to do in a dialog
# that blocks the page. The tests save each notebook themselves when it has run.
USER_SETTINGS = {"@jupyterlab/docmanager-extension/plugin": {"autosave": False}}


@dataclass
class LabServer:
    """``jupyter lab`` serving ``root`` on 127.0.0.1 for this test run only."""

    root: Path
    state: Path  # config, data, runtime and the server log go here
    env: dict[str, str] = field(default_factory=dict)
    port: int = field(default_factory=free_port)
    token: str = field(default_factory=lambda: secrets.token_hex(16))
    proc: subprocess.Popen | None = None
    log: IO[str] | None = field(default=None, repr=False)
    unused_extensions: ClassVar[tuple[str, ...]] = UNUSED_SERVER_EXTENSIONS

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def url(self, path: str = "lab") -> str:
        return f"{self.base}/{path}?token={self.token}"

    def command(self) -> list[str]:
        root_flag = ["--allow-root"] if os.geteuid() == 0 else []  # CI runs as root
        return [sys.executable, "-m", "jupyterlab", "--no-browser", *root_flag,
                f"--IdentityProvider.token={self.token}", f"--ServerApp.port={self.port}",
                "--ServerApp.ip=127.0.0.1", "--ServerApp.port_retries=0",
                f"--ServerApp.root_dir={self.root}",
                "--LabApp.expose_app_in_browser=True",
                "--LabApp.check_for_updates_class=jupyterlab.NeverCheckForUpdate",
                "--LabApp.news_url=", "--LabApp.extension_manager=readonly",
                "--ServerApp.terminals_enabled=False",
                *(f"--ServerApp.jpserver_extensions={name}=False"
                  for name in self.unused_extensions)]

    def environment(self) -> dict[str, str]:
        folders = {name: self.state / name for name in ("config", "data", "runtime")}
        for path in folders.values():
            path.mkdir(parents=True, exist_ok=True)
        labconfig = folders["config"] / "labconfig"
        labconfig.mkdir(exist_ok=True)
        (labconfig / "page_config.json").write_text(
            json.dumps({"disabledExtensions": DISABLED_PLUGINS}))
        for plugin, settings in USER_SETTINGS.items():
            path = folders["config"] / "lab" / "user-settings" / f"{plugin}.jupyterlab-settings"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(settings))
        env = {k: v for k, v in os.environ.items() if not k.startswith("JUPYTER")}
        env.pop("SOFTHSM2_CONF", None)  # each home provisions its own
        return {**env, "JUPYTER_CONFIG_DIR": str(folders["config"]),
                "JUPYTER_DATA_DIR": str(folders["data"]),
                "JUPYTER_RUNTIME_DIR": str(folders["runtime"]),
                "JUPYTER_PLATFORM_DIRS": "1", "PYTHONUNBUFFERED": "1", **self.env}

    def start(self, timeout: float = 120) -> LabServer:
        env = self.environment()  # makes the state folders
        self.log = (self.state / "lab.log").open("w")
        self.proc = subprocess.Popen(self.command(), stdout=self.log, stderr=subprocess.STDOUT,
                                     env=env, cwd=self.root,
                                     start_new_session=True)
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"jupyter lab exited with {self.proc.returncode}:\n"
                                   + self.read_log())
            try:
                with urllib.request.urlopen(self.url("api/status"), timeout=10) as r:
                    if r.status == 200:
                        return self
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"jupyter lab did not answer in {timeout} s:\n"
                                   + self.read_log())
            time.sleep(0.25)

    def read_log(self) -> str:
        try:
            return (self.state / "lab.log").read_text()
        except OSError:
            return ""

    def stop(self) -> None:
        """SIGTERM to the server's own process group (its kernels too), SIGKILL if it hangs."""
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=5)
        if self.log is not None:
            self.log.close()
            self.log = None

    def __enter__(self) -> LabServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def copy_notebooks(dest: Path) -> list[str]:
    """The committed notebooks copied into ``dest`` (Lab saves into its copies, never the repo)."""
    dest.mkdir(parents=True, exist_ok=True)
    names = []
    for nb in sorted(NOTEBOOKS.glob("*.ipynb")):
        shutil.copy(nb, dest / nb.name)
        names.append(nb.name)
    return names


# -- the network as an air-gapped desk sees it ---------------------------------------------------
class OffMachine:
    """Every request URL of a browser context; requests off the machine are aborted and kept."""

    def __init__(self, context) -> None:
        self.urls: list[str] = []
        self.blocked: list[str] = []
        context.route("**/*", self._route)
        context.on("request", lambda req: self.urls.append(req.url))
        context.on("page", self._watch_page)
        for page in context.pages:
            self._watch_page(page)

    def _watch_page(self, page) -> None:
        page.on("websocket", lambda ws: self.urls.append(ws.url))

    @staticmethod
    def is_local(url: str) -> bool:
        parts = urlsplit(url)
        return parts.scheme in LOCAL_SCHEMES or parts.hostname in LOCAL_HOSTS

    def _route(self, route) -> None:
        url = route.request.url
        if self.is_local(url):
            route.continue_()
        else:
            self.blocked.append(url)
            route.abort("internetdisconnected")

    def off_machine(self) -> list[str]:
        return sorted({u for u in self.urls + self.blocked if not self.is_local(u)})


# -- driving a notebook ---------------------------------------------------------------------------
def wait_for_app(page, timeout_ms: int = 120_000) -> None:
    """Until the Lab app object is there and its shell is attached."""
    page.wait_for_function("() => window.jupyterapp && window.jupyterapp.shell "
                           "&& document.querySelector('#jp-main-dock-panel')",
                           timeout=timeout_ms)


def execute_command(page, command: str, args: dict | None = None) -> None:
    page.evaluate("async ([c, a]) => { await window.jupyterapp.commands.execute(c, a); }",
                  [command, args or {}])


# Notebooks are kept by path in window.__kl: {widget, result} (result: when Run All ended).
OPEN = """async paths => {
    window.__kl = window.__kl || {};
    for (const p of paths) {
        const widget = await window.jupyterapp.commands.execute('docmanager:open', {path: p});
        window.__kl[p] = {widget: widget, result: undefined};
    }
}"""
KERNEL_IDLE = """p => {
    const s = window.__kl[p];
    const c = s && s.widget.sessionContext;
    return !!(c && c.session && c.session.kernel) && c.kernelDisplayStatus === 'idle';
}"""
ACTIVATE = """p => { window.jupyterapp.shell.activateById(window.__kl[p].widget.id); }"""
IS_CURRENT = """p => window.jupyterapp.shell.currentWidget === window.__kl[p].widget"""
START_RUN_ALL = """p => {
    const s = window.__kl[p];
    window.jupyterapp.commands.execute('notebook:run-all-cells').then(
        () => { s.result = 'done'; }, e => { s.result = 'failed: ' + e; });
}"""
CELLS = """p => {
    const cells = window.__kl[p].widget.content.model.cells;
    const out = [];
    for (let i = 0; i < cells.length; i++) {
        const c = cells.get(i);
        if (c.type !== 'code') continue;
        out.push({id: c.id, count: c.executionCount,
                  errors: c.outputs.toJSON().filter(o => o.output_type === 'error')
                           .map(o => `${o.ename}: ${o.evalue}`)});
    }
    return out;
}"""


def open_notebooks(page, paths: list[str]) -> None:
    """Open each path (relative to the server root) in its own Lab tab, kernels starting."""
    page.evaluate(OPEN, paths)


def activate(page, path: str) -> None:
    page.evaluate(ACTIVATE, path)
    page.wait_for_function(IS_CURRENT, arg=path, timeout=30_000)


def start_run_all(page, path: str, timeout_ms: int = 180_000) -> None:
    """Once its kernel is idle: bring the notebook to the front and start Run All Cells (the
    Run menu's command); it runs on while other notebooks are driven."""
    page.wait_for_function(KERNEL_IDLE, arg=path, timeout=timeout_ms)
    activate(page, path)
    page.evaluate(START_RUN_ALL, path)


def finish_run_all(page, path: str, timeout_ms: int = 400_000) -> list[dict]:
    """Wait until Run All ended and the kernel is idle; each code cell's id, execution count and
    errors."""
    page.wait_for_function("p => window.__kl[p].result !== undefined", arg=path,
                           timeout=timeout_ms)
    page.wait_for_function(KERNEL_IDLE, arg=path, timeout=timeout_ms)
    result = page.evaluate("p => window.__kl[p].result", path)
    assert result == "done", f"{path}: Run All {result}"
    return page.evaluate(CELLS, path)


# What a chart output is in Lab's DOM: an output area rendering image/svg+xml (our renderer) or
# image/png, a vega-embed view (Altair's widget). For each: did it draw? Panel/Bokeh views live in
# shadow roots: their Vega charts and all text are gathered through those too.
CHART_REPORT = """p => {
    const node = window.__kl[p].widget.node;
    const deep = (root, sel, out) => {
        out.push(...root.querySelectorAll(sel));
        for (const el of root.querySelectorAll('*')) if (el.shadowRoot) deep(el.shadowRoot, sel, out);
        return out;
    };
    const text = n => {
        let out = n.shadowRoot ? text(n.shadowRoot) : '';
        for (const c of n.childNodes) {
            if (c.nodeType === Node.TEXT_NODE) out += c.textContent;
            else if (c.nodeType === Node.ELEMENT_NODE && !['STYLE', 'SCRIPT'].includes(c.tagName))
                out += ' ' + text(c);
        }
        return out;
    };
    const charts = [];
    for (const o of node.querySelectorAll('.jp-OutputArea-output')) {
        const mime = o.getAttribute('data-mime-type') || '';
        if (mime.startsWith('image/')) {
            const img = o.querySelector('img');
            const svg = o.querySelector('svg');
            charts.push({mime, drawn: !!((img && img.complete && img.naturalWidth > 0)
                                         || (svg && svg.childElementCount > 0)),
                         width: img ? img.naturalWidth : (svg ? svg.clientWidth : 0)});
        }
    }
    for (const v of node.querySelectorAll('.vega-embed')) {
        charts.push({mime: 'vega-embed', drawn: !!v.querySelector('canvas, svg.marks'),
                     width: v.clientWidth});
    }
    const light = new Set(node.querySelectorAll('.vega-embed'));
    const panel = deep(node, '.vega-embed', []).filter(v => !light.has(v)).map(v => ({
        mime: 'panel-vega', drawn: !!v.querySelector('canvas, svg.marks'), width: v.clientWidth}));
    return {charts: charts, panel_charts: panel, text: text(node).replace(/\\s+/g, ' ')};
}"""


def chart_report(page, path: str) -> dict:
    return page.evaluate(CHART_REPORT, path)


def wait_for_charts(page, path: str, expected: int, timeout_ms: int = 60_000) -> dict:
    """Until at least ``expected`` chart outputs are in the DOM and each has drawn."""
    page.wait_for_function(
        f"""p => {{
            const r = ({CHART_REPORT})(p);
            return r.charts.length >= {expected} && r.charts.every(c => c.drawn);
        }}""", arg=path, timeout=timeout_ms)
    return chart_report(page, path)


def close_notebook(page, path: str) -> None:
    """Save the notebook (into the copy), shut its kernel down and close it."""
    page.evaluate("""async p => {
        const w = window.__kl[p].widget;
        await w.context.save();
        await w.sessionContext.shutdown();
        w.dispose();
    }""", path)


def set_theme(page, dark: bool) -> None:
    theme = "JupyterLab Dark" if dark else "JupyterLab Light"
    execute_command(page, "apputils:change-theme", {"theme": theme})
    page.wait_for_function(
        "t => document.body.dataset.jpThemeName === t", arg=theme, timeout=30_000)


# -- a small demo estate ----------------------------------------------------------------------------
def seed_small_demo(home: Path, log: Path) -> subprocess.Popen:
    """``keyledger demo`` with the smallest estate (20 keys, 2 months), started in the
    background; wait on the returned process."""
    env = {k: v for k, v in os.environ.items() if k not in ("KEYLEDGER_HOME", "SOFTHSM2_CONF")}
    code = ("import sys; from keyledger.cli import main; sys.exit(main(['demo', '--home', "
            f"{str(home)!r}, '--keys', '20', '--months', '2', '--seed', '11', "
            "'--no-progress']))")
    return subprocess.Popen([sys.executable, "-c", code], stdout=log.open("w"),
                            stderr=subprocess.STDOUT, env=env, cwd=ROOT,
                            start_new_session=True)


def copy_small_demo(dest: Path, cache: Path, log: Path) -> None:
    """``dest`` (and ``dest``-backups): a copy of the small demo estate kept in ``cache``, which
    the first caller of the test run seeds (``seed_small_demo``) while later ones wait on a lock
    (xdist workers included). The copy's SoftHSM2 config names its own token folder, as a
    restored home's does."""
    from keyledger.hsm.softhsm import softhsm_conf_text

    dest.mkdir(parents=True)  # not empty from now on: a tour's fresh_home() will not take it
    (dest / SEEDING).touch()
    cache.mkdir(parents=True, exist_ok=True)
    home = cache / "demo-home"
    with (cache / "seeding.lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not _seeded(home):
            shutil.rmtree(home, ignore_errors=True)
            shutil.rmtree(f"{home}-backups", ignore_errors=True)
            proc = seed_small_demo(home, log)
            if proc.wait(timeout=600) != 0:
                raise RuntimeError(f"seeding the demo estate failed:\n{log.read_text()[-3000:]}")
        shutil.copytree(home, dest, symlinks=True, dirs_exist_ok=True)
        shutil.copytree(f"{home}-backups", f"{dest}-backups", symlinks=True)
    (dest / "softhsm2.conf").write_text(softhsm_conf_text(dest / "tokens"))
    (dest / SEEDING).unlink()
    demo = dest / "demo.json"  # it names the backups by path
    demo.write_text(demo.read_text().replace(str(home), str(dest)))


SEEDING = "seeding-in-progress"


def _seeded(home: Path) -> bool:
    try:
        return json.loads((home / "demo.json").read_text()).get("status") == "complete"
    except (OSError, ValueError):
        return False


def run_cache(base: Path) -> Path:
    """A folder every module of this test run shares: pytest's base temp folder (above the
    xdist workers' own)."""
    return base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base


# -- the key grid at laptop size ------------------------------------------------------------------
LAPTOP = {"width": 1280, "height": 900}
# The dashboard's Keys tab in notebook ``p``: the side column (actions + details, class
# kl-keys-side) and the grid in the same row. Marks one unselected row for a real click.
GRID_LAYOUT = """p => {
    const node = window.__kl[p].widget.node;
    const side = node.querySelector('.kl-keys-side');
    const body = side.parentElement;
    const box = body.querySelector('.kl-grid');
    box.scrollIntoView({block: 'start'});
    const top = box.getBoundingClientRect().top;
    box.scrollTop = 60;  // is the header sticky?
    const headTop = box.querySelector('thead th').getBoundingClientRect().top;
    box.scrollTop = 0;
    const rows = [...box.querySelectorAll('tbody tr[data-key]')];
    const heights = rows.map(r => r.getBoundingClientRect().height);
    const lineHeight = parseFloat(getComputedStyle(rows[0].cells[0]).lineHeight);
    const rotate = [...side.querySelectorAll('button')].find(b => b.textContent.trim() === 'Rotate');
    const pick = rows.find(r => !r.classList.contains('kl-selected') && r.rowIndex > 1) || rows[0];
    pick.setAttribute('data-kl-test', 'pick');
    const g = box.getBoundingClientRect(), s = side.getBoundingClientRect();
    return {viewport: [window.innerWidth, window.innerHeight],
            left_panel_open: !window.jupyterapp.shell.leftCollapsed,
            grid_box: {top: g.top, height: g.height, width: g.width},
            scrolls: {down: box.scrollHeight > box.clientHeight,
                      sideways: box.scrollWidth > box.clientWidth},
            sticky_header: Math.abs(headTop - top) < 2,
            rows: rows.length, row_height: heights[0], max_row_height: Math.max(...heights),
            line_height: lineHeight, side_beside: s.left >= g.right - 1,
            rotate_below_grid_top: rotate ? rotate.getBoundingClientRect().top - top : null,
            picked: pick.dataset.key};
}"""
GRID_PICKED = """([p, key]) => {
    const side = window.__kl[p].widget.node.querySelector('.kl-keys-side');
    const row = side.parentElement.querySelector(`.kl-grid tr.kl-selected`);
    const title = side.querySelector('h3');
    const field = [...side.querySelectorAll('input')].find(i => i.value === key);
    return !!(row && row.dataset.key === key && title && title.textContent.startsWith(key + ' ')
              && field);
}"""


def check_key_grid(page, path: str) -> dict:
    """At 1280x900 with the file browser open: measure the dashboard's Keys tab in ``path``,
    click one grid row and wait until the details pane and the actions name that key."""
    page.set_viewport_size(LAPTOP)
    try:
        if page.evaluate("() => window.jupyterapp.shell.leftCollapsed"):
            execute_command(page, "filebrowser:activate")
        activate(page, path)
        page.wait_for_function(
            "p => window.__kl[p].widget.node.querySelector('.kl-keys-side .widget-button')",
            arg=path, timeout=30_000)
        report = page.evaluate(GRID_LAYOUT, path)
        page.click("[data-kl-test=pick] td:first-child")
        page.wait_for_function(GRID_PICKED, arg=[path, report["picked"]], timeout=30_000)
        report["click_selected"] = True
        return report
    finally:
        page.set_viewport_size({"width": 1400, "height": 1000})
