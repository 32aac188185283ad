"""Must show (issue 7 item 4): the notebooks execute with nbclient on a real kernel against a
fresh home (04: a small demo estate seeded first), and are committed without outputs.

Each notebook runs once, in a kernel started from THIS interpreter (the project's venv, whatever
kernelspecs the machine has), with ``KEYLEDGER_HOME`` pointing at a new folder in tmp. The three
run at once, each driven by its own subprocess (this file run as a script), on first use.
The tests then read outputs of tagged cells (``metadata.tags``, set in scripts/make_notebooks.py)
and check what a reader relies on: old ciphertext decrypts after rotation, the report file
exists, the retire-safety table names the old version, ...
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import nbformat
import pytest
from jupyter_client.kernelspec import KernelSpecManager
from jupyter_client.manager import KernelManager
from nbclient import NotebookClient

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOKS = ROOT / "notebooks"
NAMES = ("01-quickstart", "02-rotation-and-compliance", "03-audit-analytics",
         "04-security-engineers-morning")
MORNING = "04-security-engineers-morning"
KERNEL = "keyledger-test-venv"
TIMEOUT = 180  # per cell


# -- running ---------------------------------------------------------------------------------------
def _kernel_manager(spec_dir: Path) -> KernelManager:
    """A kernel manager whose only kernelspec runs ipykernel with this interpreter."""
    kdir = spec_dir / KERNEL
    kdir.mkdir(parents=True, exist_ok=True)
    (kdir / "kernel.json").write_text(json.dumps({
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "keyledger test (venv)", "language": "python"}))
    ksm = KernelSpecManager(kernel_dirs=[str(spec_dir)], ensure_native_kernel=False)
    return KernelManager(kernel_name=KERNEL, kernel_spec_manager=ksm)


PROBE = "import sys; print('KERNEL-EXECUTABLE=' + sys.executable)"
# Test-only first cell: wide text tables, so a row's values sit on one line of text/plain.
WIDE = ("import pandas as pd; pd.set_option('display.width', 250); "
        "pd.set_option('display.max_columns', 50); pd.set_option('display.max_colwidth', 60)")


def execute(name: str, workdir: Path, cache: Path) -> nbformat.NotebookNode:
    nb = nbformat.read(NOTEBOOKS / f"{name}.ipynb", as_version=4)
    nb.cells.insert(0, nbformat.v4.new_code_cell(WIDE, id="test-wide"))
    nb.cells.append(nbformat.v4.new_code_cell(PROBE, id="test-probe"))
    home = workdir / "home"
    if name == MORNING:  # the morning opens a demo estate: the smallest one, seeded once a run
        from jupyterlab_support import copy_small_demo

        copy_small_demo(home, cache, workdir / "seed.log")
    env = {**os.environ, "KEYLEDGER_HOME": str(home), "TMPDIR": str(workdir),
           "PYTHONWARNINGS": "default"}
    env.pop("SOFTHSM2_CONF", None)  # the home provisions its own
    client = NotebookClient(nb, km=_kernel_manager(workdir / "kernels"), timeout=TIMEOUT,
                            allow_errors=False,
                            resources={"metadata": {"path": str(workdir)}})
    client.execute(env=env)
    nb.metadata["test_home"] = str(home)
    return nb


@pytest.fixture(scope="module")
def executed(tmp_path_factory: pytest.TempPathFactory):
    """``executed(name)``: the notebook after a run on a fresh home (all three start together)."""
    runs: dict[str, tuple[subprocess.Popen, Path]] = {}
    done: dict[str, nbformat.NotebookNode] = {}

    def start_all() -> None:
        from jupyterlab_support import run_cache

        cache = run_cache(tmp_path_factory.getbasetemp()) / "small-demo"
        for name in NAMES:
            workdir = tmp_path_factory.mktemp(name)
            proc = subprocess.Popen([sys.executable, __file__, name, str(workdir), str(cache)],
                                    cwd=ROOT,
                                    stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
            runs[name] = (proc, workdir)

    def run(name: str) -> nbformat.NotebookNode:
        if not runs:
            start_all()
        if name not in done:
            proc, workdir = runs[name]
            log, _ = proc.communicate(timeout=600)
            if proc.returncode != 0:
                pytest.fail(f"{name} did not run to the end:\n{log[-6000:]}", pytrace=False)
            done[name] = nbformat.read(workdir / "executed.ipynb", as_version=4)
        return done[name]

    yield run
    for proc, _ in runs.values():
        if proc.poll() is None:
            proc.kill()
            proc.wait()


# -- reading outputs ---------------------------------------------------------------------------------
def tagged(nb: nbformat.NotebookNode, tag: str) -> nbformat.NotebookNode:
    cells = [c for c in nb.cells if tag in c.get("metadata", {}).get("tags", [])]
    assert len(cells) == 1, f"expected one cell tagged {tag!r}, found {len(cells)}"
    return cells[0]


def text(cell: nbformat.NotebookNode) -> str:
    """Everything a reader sees of a cell, as text (streams, text/plain, text/html). A stream
    may arrive in several outputs split mid-line (the kernel flushes on a timer), so consecutive
    outputs of one stream are joined as they were printed."""
    parts: list[str] = []
    previous = None
    for out in cell.get("outputs", []):
        if out["output_type"] == "stream":
            if previous == ("stream", out["name"]):
                parts[-1] += out["text"]
            else:
                parts.append(out["text"])
        elif "data" in out:
            parts.extend(str(out["data"].get(m, "")) for m in ("text/plain", "text/html"))
        previous = (out["output_type"], out.get("name"))
    return "\n".join(parts)


def mimetypes(cell: nbformat.NotebookNode) -> set[str]:
    return {m for out in cell.get("outputs", []) for m in out.get("data", {})}


def charts(cell: nbformat.NotebookNode) -> list[str]:
    """The Altair charts a cell displayed: SVG drawn in the kernel (keyledger.notebook.setup()),
    never HTML that loads Vega from a CDN."""
    outputs = cell.get("outputs", [])
    assert not any("vegaEmbed" in str(o.get("data", {}).get("text/html", "")) for o in outputs)
    return [out["data"]["image/svg+xml"] for out in outputs
            if "<svg" in out.get("data", {}).get("image/svg+xml", "")]


def all_charts(nb: nbformat.NotebookNode) -> list[str]:
    return [html for cell in nb.cells for html in charts(cell)]


# -- every notebook ----------------------------------------------------------------------------------
@pytest.mark.parametrize("name", NAMES)
def test_runs_top_to_bottom_on_a_fresh_home_in_the_venv_kernel(executed, name: str) -> None:
    nb = executed(name)
    errors = [o for c in nb.cells for o in c.get("outputs", []) if o["output_type"] == "error"]
    assert errors == []
    stderr = [(c.id, o["text"]) for c in nb.cells for o in c.get("outputs", [])
              if o["output_type"] == "stream" and o["name"] == "stderr"]
    assert stderr == [], "cells wrote to stderr (warnings a reader would see)"
    probe = text(nb.cells[-1])
    assert f"KERNEL-EXECUTABLE={sys.executable}" in probe
    home = Path(nb.metadata["test_home"])
    assert (home / "keyledger.duckdb").is_file(), "the notebook did not use $KEYLEDGER_HOME"
    unexecuted = [c.id for c in nb.cells if c.cell_type == "code" and c.execution_count is None]
    assert unexecuted == []


@pytest.mark.parametrize("name", NAMES)
def test_committed_without_outputs_and_valid(name: str) -> None:
    nb = nbformat.read(NOTEBOOKS / f"{name}.ipynb", as_version=4)
    nbformat.validate(nb)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert code
    assert all(c.outputs == [] and c.execution_count is None for c in code)
    assert nb.metadata["kernelspec"]["name"] == "python3"
    assert sum(c.cell_type == "markdown" for c in nb.cells) >= 5  # a narrative, not a script


def test_notebooks_match_their_generator() -> None:
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "make_notebooks.py"), "--check"],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr


def test_a_tour_never_runs_in_a_home_that_already_holds_keys(tmp_path: Path, monkeypatch) -> None:
    """The notebooks' fresh_home(): $KEYLEDGER_HOME only if it holds no home yet."""
    spec = importlib.util.spec_from_file_location("make_notebooks",
                                                  ROOT / "scripts" / "make_notebooks.py")
    gen = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gen)
    ns: dict = {}
    exec("import os, tempfile\nfrom pathlib import Path\n" + gen.FRESH_HOME, ns)
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    monkeypatch.setattr(tempfile, "tempdir", None)
    new = tmp_path / "new-home"
    monkeypatch.setenv("KEYLEDGER_HOME", str(new))
    assert ns["fresh_home"]("t") == new
    used = tmp_path / "used-home"
    used.mkdir()
    (used / "keyledger.duckdb").write_bytes(b"")
    monkeypatch.setenv("KEYLEDGER_HOME", str(used))
    other = ns["fresh_home"]("t")
    assert other != used and not other.exists() and other.parent.parent == tmp_path
    monkeypatch.delenv("KEYLEDGER_HOME")
    assert ns["fresh_home"]("t").parent.name.startswith("keyledger-t-")


def test_the_morning_tour_runs_only_on_a_demo_home(tmp_path: Path, monkeypatch) -> None:
    """It rotates a key: $KEYLEDGER_HOME (or ./demo-home above) must hold demo.json."""
    spec = importlib.util.spec_from_file_location("make_notebooks",
                                                  ROOT / "scripts" / "make_notebooks.py")
    gen = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gen)
    ns: dict = {}
    exec("import os\nfrom pathlib import Path\n" + gen.DEMO_HOME, ns)
    real = tmp_path / "real-home"
    real.mkdir()
    (real / "keyledger.duckdb").write_bytes(b"")
    monkeypatch.setenv("KEYLEDGER_HOME", str(real))
    with pytest.raises(FileNotFoundError, match="only runs on a demo home"):
        ns["demo_home"]()
    (real / "demo.json").write_text("{}")
    assert ns["demo_home"]() == real
    monkeypatch.delenv("KEYLEDGER_HOME")
    nested = tmp_path / "checkout" / "notebooks"
    nested.mkdir(parents=True)
    monkeypatch.chdir(nested)
    with pytest.raises(FileNotFoundError, match="make notebook"):
        ns["demo_home"]()
    (tmp_path / "checkout" / "demo-home").mkdir()
    (tmp_path / "checkout" / "demo-home" / "demo.json").write_text("{}")
    assert ns["demo_home"]() == (tmp_path / "checkout" / "demo-home").resolve()


# -- 01 quickstart -----------------------------------------------------------------------------------
def test_quickstart_old_ciphertext_decrypts_after_rotation(executed) -> None:
    nb = executed("01-quickstart")
    out = text(tagged(nb, "decrypt-old"))
    assert "active v2" in out
    assert "v1 ciphertext after rotation -> card 4111 1111 1111 1111" in out
    assert "v2 ciphertext                -> card 5500 0000 0000 0004" in out
    assert "InvalidCiphertext" in text(tagged(nb, "wrong-context"))
    rewrap = text(tagged(nb, "rewrap"))
    assert "orders v1: 1, orders v2: 1" in rewrap


def test_quickstart_signs_denies_and_audits(executed) -> None:
    nb = executed("01-quickstart")
    sign = text(tagged(nb, "sign"))
    assert "genuine : True" in sign and "tampered: False" in sign
    assert "BEGIN PUBLIC KEY" in sign
    denied = text(tagged(nb, "denied"))
    assert "AccessDenied" in denied and "mallory" in denied
    tail = text(tagged(nb, "audit-tail"))
    assert re.search(r"mallory\s+decrypt\s+orders\s+<NA>\s+denied\s+AccessDenied", tail), tail
    summary = text(tagged(nb, "audit-summary"))
    for row in (r"rotate\s+ok\s+1", r"decrypt\s+failed\s+1", r"decrypt\s+denied\s+1",
                r"create_key\s+ok\s+2", r"sign\s+ok\s+1"):
        assert re.search(row, summary), (row, summary)
    assert "audit ledger OK" in text(tagged(nb, "verify"))


def test_quickstart_shows_the_key_and_the_inventory_widget(executed) -> None:
    nb = executed("01-quickstart")
    key = tagged(nb, "key-display")
    assert "orders" in text(key)
    assert "text/html" in mimetypes(key), "Key has no rich (HTML) display"
    assert "application/vnd.jupyter.widget-view+json" in mimetypes(tagged(nb, "widget"))


# -- 02 rotation and compliance ----------------------------------------------------------------------
def test_rotation_policies_and_due_work_over_simulated_months(executed) -> None:
    nb = executed("02-rotation-and-compliance")
    policies = text(tagged(nb, "policies"))
    assert "tag env=prod" in policies and "home" in policies
    due = text(tagged(nb, "run-due"))
    assert "30 days reached (tag env=prod policy)" in due  # payments, by the tag rule
    assert "reached its usage limit" in due               # reports, by usage
    assert "legacy-archive" not in due                      # auto_rotate is off
    after = text(tagged(nb, "after-run-due"))
    assert re.search(r"(\d+) of \1 stored ciphertexts decrypt", after)
    assert re.search(r"legacy-archive\s+active\s+1\s.*overdue", after)


def test_compliance_findings_remediation_charts_and_report(executed) -> None:
    nb = executed("02-rotation-and-compliance")
    assert "rotation-overdue" in text(tagged(nb, "findings"))
    assert "legacy-archive" in text(tagged(nb, "evidence"))
    m = re.search(r"open findings: (\d+) before, (\d+) after remediation",
                  text(tagged(nb, "remediate")))
    assert m and int(m.group(2)) < int(m.group(1))
    for tag in ("rotation-chart-before", "rotation-chart-after", "heatmap", "trend"):
        assert len(charts(tagged(nb, tag))) == 1, tag
    assert "legacy-archive" in charts(tagged(nb, "rotation-chart-after"))[0]
    # aggregated before charting: no megabytes of JSON in the notebook
    assert max(len(html) for html in all_charts(nb)) < 200_000
    m = re.search(r"report written to (\S+) \(", text(tagged(nb, "report")))
    assert m, "the report cell does not say where the report is"
    report = Path(m.group(1))
    assert report.is_file()
    html = report.read_text(encoding="utf-8")
    assert "<html" in html.lower()
    assert "partner-exchange" in html and "card processor" in html  # the accepted exception
    assert report.with_suffix(".md").is_file()


def test_compliance_notebook_shows_the_dashboard_widget(executed) -> None:
    nb = executed("02-rotation-and-compliance")
    assert "application/vnd.jupyter.widget-view+json" in mimetypes(tagged(nb, "widget"))


# -- 03 audit analytics ------------------------------------------------------------------------------
def test_sql_over_the_ledger_and_the_parquet_export(executed) -> None:
    nb = executed("03-audit-analytics")
    overview = text(tagged(nb, "sql-overview"))
    assert "decrypt" in overview and "denied" in overview and "failed" in overview
    denied = text(tagged(nb, "sql-denied"))
    assert "svc-orders" in denied and "AccessDenied" in denied
    assert "svc-fraud" in text(tagged(nb, "sql-who-decrypts"))
    readonly = text(tagged(nb, "sql-readonly"))
    assert "InvalidInput" in readonly and "read-only" in readonly
    export = text(tagged(nb, "export"))
    m = re.search(r"(\S+): (\d+) day partitions", export)
    assert m and int(m.group(2)) >= 60
    assert any(Path(m.group(1)).glob("day=*/*.parquet"))
    chain = text(tagged(nb, "parquet-chain"))
    assert re.search(r"broken_links.*\n.*\s0\s*$", chain, re.M | re.S) or \
        re.search(r"\s0\s*\n", chain.split("broken_links", 1)[1])
    assert "spike" in text(tagged(nb, "unusual")) and "new principal" in text(tagged(nb, "unusual"))
    assert len(all_charts(nb)) == 5
    assert max(len(html) for html in all_charts(nb)) < 200_000


def test_retire_safety_names_the_old_version_and_retires_it(executed) -> None:
    nb = executed("03-audit-analytics")
    before = text(tagged(nb, "retire-safety"))
    assert re.search(r"payments\s+1\s.*False", before), before
    assert not re.search(r"payments\s+2\s", before)  # the current version is not a candidate
    assert "rewrapped" in text(tagged(nb, "rewrap"))
    after = text(tagged(nb, "retire-safety-after"))
    assert re.search(r"payments\s+1\s.*\s0\s.*True", after), after
    retired = text(tagged(nb, "retire"))
    assert "KeyStateError" in retired and "minimum decryption version" in retired
    trimmed = text(tagged(nb, "trim"))
    assert re.search(r"payments\s+1\s+destroyed", trimmed), trimmed


# -- 04 a security engineer's morning ------------------------------------------------------------
def test_morning_overdue_findings_unusual_and_charts(executed) -> None:
    nb = executed(MORNING)
    assert "as security-lead" in text(tagged(nb, "open"))
    overdue = text(tagged(nb, "overdue"))
    assert re.search(r"[1-9]\d* overdue", overdue), overdue
    assert "critical" in text(tagged(nb, "findings")) or "high" in text(tagged(nb, "findings"))
    for tag in ("rotation-chart", "heatmap", "ops-chart"):
        assert len(charts(tagged(nb, tag))) == 1, tag
    assert "kind" in text(tagged(nb, "unusual"))
    assert "AccessDenied" in text(tagged(nb, "denied"))
    for tag in ("inventory", "compliance-view", "rotate", "audit-browser"):
        assert "application/vnd.jupyter.widget-view+json" in mimetypes(tagged(nb, tag)), tag


def test_morning_rotates_the_most_overdue_key_through_the_widgets(executed) -> None:
    nb = executed(MORNING)
    rotated = text(tagged(nb, "rotate"))
    m = re.search(r"^(\S+): rotated '\1' to version (\d+)", rotated, re.M)
    assert m, rotated
    after = text(tagged(nb, "after-rotate"))
    assert f"<Key '{m.group(1)}'" in after and f"active v{m.group(2)}" in after
    assert re.search(rf"rotate\s+{re.escape(m.group(1))}\s+{m.group(2)}\s+ok", after), after


if __name__ == "__main__":  # one notebook in its own process: test_notebooks.py NAME DIR CACHE
    _name, _workdir = sys.argv[1], Path(sys.argv[2])
    nbformat.write(execute(_name, _workdir, Path(sys.argv[3])), _workdir / "executed.ipynb")
