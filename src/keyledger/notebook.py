"""Charts that render with no network: one call, ``keyledger.notebook.setup()``.

Altair's default renderer loads Vega from a CDN when a chart is shown, so on an air-gapped
machine every chart says "Error loading script". ``setup()`` switches Altair to a renderer that
needs nothing from outside the machine:

- ``"svg"`` (the default): the chart drawn to SVG in the kernel by vl-convert (Vega compiled
  into a Python wheel). It renders in JupyterLab 4, Notebook 7, VS Code, in HTML exported by
  nbconvert or "Save and Export Notebook As", and in a notebook reopened without a kernel.
- ``"png"``: the same, as a PNG image (for viewers without SVG).
- ``"interactive"``: Altair's ``JupyterChart`` widget (anywidget) with Vega's JavaScript sent
  from the kernel (vl-convert's bundle), so tooltips and selections work offline wherever
  ipywidgets 8 work; the static SVG rides along in the same output for exporters. A widget
  needs its kernel: reopened without one, or executed with ``nbconvert --execute`` (which stores
  widget state), it does not redraw; use ``"svg"`` for files you hand on.

    import keyledger.notebook
    keyledger.notebook.setup()            # once per kernel; the widgets call it for you

The keyledger widgets and ``import keyledger.charts`` in a kernel call ``ensure_setup()``, which
runs ``setup()`` only while Altair still has its CDN-loading default renderer, so a renderer
chosen by hand (``alt.renderers.enable(...)``) is kept. See docs/notebooks.md.
"""

from __future__ import annotations

import sys
from typing import Any

from .errors import ConfigError, InvalidInput

RENDERERS = ("svg", "png", "interactive")
DEFAULT_RENDERER = "svg"
RENDERER_NAME = "keyledger"  # the name setup() registers its renderer under in Altair
# Altair renderers that fetch Vega from a CDN (or need a frontend extension that JupyterLab 4.6
# lacks for Vega-Lite 6): ensure_setup() replaces these, and keeps any other choice.
NETWORK_RENDERERS = frozenset({"default", "html", "colab", "kaggle", "zeppelin", "olli",
                               "mimetype", "jupyterlab", "nteract"})

_state: dict[str, str | None] = {"renderer": None}


def setup(renderer: str = DEFAULT_RENDERER) -> str:
    """Make Altair charts render offline in this process; returns the renderer chosen.

    ``renderer`` is ``"svg"`` (default), ``"png"`` or ``"interactive"`` (see the module doc).
    Calling it again switches renderer; it never touches the network.
    """
    if renderer not in RENDERERS:
        raise InvalidInput(f"setup(renderer=...) takes one of {', '.join(RENDERERS)}, "
                           f"not {renderer!r}")
    alt = _altair()
    _require_vl_convert()
    if renderer == "interactive":
        _require_anywidget()
    alt.renderers.register(RENDERER_NAME, _renderer_for(renderer))
    alt.renderers.enable(RENDERER_NAME)
    _state["renderer"] = renderer
    return renderer


def ensure_setup() -> str | None:
    """``setup()`` if Altair still uses a renderer that needs the network; else nothing.

    Called by the widgets and by ``keyledger.charts`` in a kernel: a renderer someone enabled
    by hand (``alt.renderers.enable("svg")``, another ``setup(...)``) stays. Returns the
    keyledger renderer in force, or None when another offline renderer was kept.
    """
    alt = _altair()
    active = alt.renderers.active
    if active == RENDERER_NAME:
        return _state["renderer"]
    if active in NETWORK_RENDERERS:
        return setup()
    return None


def active_renderer() -> str | None:
    """The keyledger renderer in force (``"svg"``, ...), or None if Altair uses another one."""
    alt = _altair()
    return _state["renderer"] if alt.renderers.active == RENDERER_NAME else None


def in_kernel() -> bool:
    """True inside a Jupyter kernel (ipykernel), where charts are displayed as outputs."""
    shell_module = sys.modules.get("IPython")
    if shell_module is None or "ipykernel" not in sys.modules:
        return False
    shell = shell_module.get_ipython()
    return shell is not None and type(shell).__name__ == "ZMQInteractiveShell"


def panel_extension(*extensions: str, **kwargs: Any) -> None:
    """``pn.extension(...)`` for a notebook with no network: BokehJS and Panel's JavaScript and
    CSS are inlined into the output by the kernel instead of loaded from a CDN. Call it in the
    cell before the first Panel object (``build_app`` does the same in a kernel)."""
    import panel as pn

    kwargs.setdefault("inline", True)
    pn.extension(*extensions, **kwargs)


# -- renderers ------------------------------------------------------------------------------------
def _renderer_for(renderer: str):
    if renderer == "interactive":
        return interactive_renderer
    return png_renderer if renderer == "png" else svg_renderer


def svg_renderer(spec: dict, **metadata: Any) -> dict[str, str]:
    """The chart as SVG drawn by vl-convert in this process, plus a text line."""
    from altair.vegalite.v6.display import svg_renderer as altair_svg

    bundle = dict(altair_svg(spec, **metadata))
    bundle["text/plain"] = _plain(spec)
    return bundle


def png_renderer(spec: dict, **metadata: Any
                 ) -> dict[str, Any] | tuple[dict[str, Any], dict[str, Any]]:
    """The chart as a PNG image (vl-convert, 2x scale unless ``scale_factor`` says otherwise)."""
    from altair.vegalite.v6.display import png_renderer as altair_png

    metadata.setdefault("scale_factor", 2)
    # altair types the result dict[str, bytes]; it may also be (data, metadata)
    result: Any = altair_png(spec, **metadata)
    data, meta = result if isinstance(result, tuple) else (result, {})
    bundle: dict[str, Any] = dict(data)
    bundle["text/plain"] = _plain(spec)
    return (bundle, meta) if meta else bundle


def interactive_renderer(spec: dict, **metadata: Any) -> tuple[dict[str, Any], dict[str, Any]]:
    """Altair's JupyterChart widget with Vega's JavaScript inlined from vl-convert (no CDN),
    and the static SVG beside it for frontends and exporters without the widget."""
    from altair import Chart, JupyterChart

    JupyterChart.enable_offline(offline=True)
    widget = JupyterChart(chart=Chart.from_dict(spec),
                          embed_options=metadata.get("embed_options"))
    result: object = widget._repr_mimebundle_() or ({}, {})
    data, meta = result if isinstance(result, tuple) else (result, {})
    static = svg_renderer(spec)
    return {**data, "image/svg+xml": static["image/svg+xml"], "text/plain": static["text/plain"]}, \
        dict(meta or {})


def _plain(spec: dict) -> str:
    title = spec.get("title")
    if isinstance(title, dict):
        title = title.get("text")
    return f"<keyledger chart{': ' + str(title) if title else ''}>"


# -- dependencies ---------------------------------------------------------------------------------
def _altair() -> Any:
    import altair as alt

    return alt


def _require_vl_convert() -> None:
    try:
        import vl_convert  # noqa: F401
    except ImportError as exc:
        raise ConfigError("offline charts need vl-convert-python, a keyledger dependency: "
                          "reinstall keyledger (`pip install -e .` or `make`)") from exc


def _require_anywidget() -> None:
    try:
        import anywidget  # noqa: F401
    except ImportError as exc:
        raise ConfigError("interactive offline charts need anywidget, a keyledger dependency: "
                          "reinstall keyledger (`pip install -e .` or `make`)") from exc


__all__ = ["DEFAULT_RENDERER", "RENDERERS", "active_renderer", "ensure_setup", "in_kernel",
           "panel_extension", "setup"]
