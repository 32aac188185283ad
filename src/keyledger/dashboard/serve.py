"""Run the dashboard with ``panel serve`` (what ``keyledger dashboard`` calls).

On a loopback address (127.0.0.1, ::1, localhost) no login is needed: the principal is
``--principal``, ``KEYLEDGER_PRINCIPAL`` or the OS user. Bound anywhere else the dashboard
refuses to start without Panel authentication: basic auth (a JSON file of user -> password,
plus a cookie secret) or OAuth (Panel's ``--oauth-*`` options, or its ``PANEL_OAUTH_*``
environment variables). With a login, the principal is the logged-in user.
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import signal
import subprocess
import sys
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import NoReturn

from ..config import is_loopback
from ..errors import ConfigError, InvalidInput

APP_NAME = "keyledger_dashboard"
# Login and logout pages without CDN resources (Panel's own load its logo from a CDN).
TEMPLATES = Path(__file__).resolve().parent / "templates"
OAUTH_ENV = "PANEL_OAUTH_PROVIDER"
BASIC_AUTH_ENV = "PANEL_BASIC_AUTH"


def dashboard_script() -> Path:
    """``dashboards/keyledger_dashboard.py`` of a source checkout, or the copy inside the
    package's folder when installed (both are the same few lines)."""
    here = Path(__file__).resolve()
    candidates = [here.parents[3] / "dashboards" / f"{APP_NAME}.py",
                  here.parent / f"{APP_NAME}.py"]
    for path in candidates:
        if path.is_file():
            return path
    raise ConfigError(f"cannot find {APP_NAME}.py (looked in "
                      f"{', '.join(str(c.parent) for c in candidates)})")


@dataclass
class ServeCommand:
    """The ``panel serve`` command line and environment ``serve`` runs."""

    argv: list[str]
    env: dict[str, str]
    url: str
    auth: str  # "none", "basic" or "oauth"
    notes: list[str] = field(default_factory=list)


def serve_command(home: str | os.PathLike | None = None, *, address: str = "127.0.0.1",
                  port: int = 5006, principal: str | None = None,
                  basic_auth: str | os.PathLike | None = None, cookie_secret: str | None = None,
                  allow_origin: Sequence[str] | None = None, show: bool = False,
                  panel_args: Sequence[str] = (), url: str | None = None) -> ServeCommand:
    """Build (and check) the command without running it. With ``url`` the dashboard is a
    client of ``keyledger serve`` there (the access key comes from the environment or the
    credentials file; the home is not opened here).

    The checks look at what Panel will make of the whole command line, pass-through
    ``panel_args`` included (they come last, so their ``--address`` or ``--port`` wins)."""
    if not isinstance(port, int) or not 0 < port < 65536:
        raise InvalidInput(f"port must be 1-65535, not {port!r}")
    env = {k: v for k, v in os.environ.items() if not k.startswith("BOKEH_")}
    home_path = Path(home).expanduser().absolute() if home is not None else None
    if home_path is not None:
        env["KEYLEDGER_HOME"] = str(home_path)
    env.pop("KEYLEDGER_URL", None)
    if url is not None:
        env["KEYLEDGER_URL"] = url
    argv = [sys.executable, "-m", "panel", "serve", str(dashboard_script()),
            "--address", address, "--port", str(port)]
    notes: list[str] = []
    if basic_auth is not None:
        path = Path(basic_auth).expanduser().absolute()
        _check_basic_auth_file(path)
        argv += ["--basic-auth", str(path), "--basic-login-template",
                 str(TEMPLATES / "login.html")]
    # what Panel makes of it so far: the address, port and login it will really use
    opts = panel_options([*argv[4:], *panel_args], env)
    if opts.basic and opts.oauth:
        raise InvalidInput("choose basic auth or OAuth, not both")
    if opts.auth != "none" and url is not None:
        raise InvalidInput("a dashboard with --url acts as its access key's principal, so a "
                           "login would not change who acts; serve it without a login, or "
                           "give each user their own access key and dashboard")
    if opts.auth != "none":
        if not any(a.startswith("--logout-template") for a in panel_args):
            argv += ["--logout-template", str(TEMPLATES / "logout.html")]
        # Panel signs its login cookies with this; passed in the environment, not on the
        # command line (where other users could read it in the process list).
        env["PANEL_COOKIE_SECRET"] = (cookie_secret or os.environ.get("PANEL_COOKIE_SECRET")
                                      or secrets.token_urlsafe(32))
        if not (cookie_secret or os.environ.get("PANEL_COOKIE_SECRET")):
            notes.append("generated a cookie secret: logins end when the server restarts "
                         "(pass --cookie-secret to keep them)")
        if principal:
            notes.append("--principal is ignored with a login: the principal is the "
                         "logged-in user")
        env.pop("KEYLEDGER_PRINCIPAL", None)  # with a login only the logged-in user counts
    elif principal:
        env["KEYLEDGER_PRINCIPAL"] = principal
    host = "127.0.0.1" if opts.address in ("", "0.0.0.0", "::") else opts.address
    shown = f"[{host}]" if ":" in host else host
    if allow_origin is None:
        allow_origin = [f"{shown}:{opts.port}"] + (
            [f"localhost:{opts.port}"] if is_loopback(opts.address) else [])
    for origin in allow_origin:
        argv += ["--allow-websocket-origin", origin]
    if show:
        argv.append("--show")
    argv += list(panel_args)
    check_exposure(panel_options(argv[4:], env))  # the final command line, as Panel reads it
    return ServeCommand(argv, env, f"http://{shown}:{opts.port}/{APP_NAME}", opts.auth, notes)


@dataclass(frozen=True)
class PanelOptions:
    """What ``panel serve`` makes of its command line and environment (the parts that decide
    who can reach the dashboard)."""

    address: str  # "" = every interface
    port: int
    origins: tuple[str, ...]  # --allow-websocket-origin values (Bokeh's default if empty)
    basic: bool
    oauth: bool

    @property
    def auth(self) -> str:
        return "basic" if self.basic else "oauth" if self.oauth else "none"


class _ParseError(Exception):
    pass


class _Parser(argparse.ArgumentParser):
    """Panel's parser, but raising instead of printing and exiting."""

    def error(self, message: str) -> NoReturn:
        raise _ParseError(message)

    def exit(self, status: int = 0, message: str | None = None) -> NoReturn:
        raise _ParseError(message or f"exit {status}")


def panel_options(args: Sequence[str], env: Mapping[str, str]) -> PanelOptions:
    """Parse ``panel serve`` arguments (those after ``serve``) with Panel's own parser, as
    ``python -m panel`` does: ``--address=x`` and ``--address x``, abbreviations such as
    ``--addr``, the last of a repeated option, anaconda-project aliases and everything after
    ``--args`` (the app's, not Panel's) all count as they will when it runs. Starts nothing."""
    from panel.command import transform_cmds
    from panel.command.serve import Serve

    parser = _Parser(prog="panel serve", add_help=False)
    Serve(parser=parser)
    try:
        ns = parser.parse_args(transform_cmds(list(args)))
    except _ParseError as exc:
        raise InvalidInput(f"`panel serve` would not accept these options: {exc} (see "
                           "`panel serve --help`)") from None
    return PanelOptions(
        address="" if ns.address is None else ns.address, port=ns.port,
        origins=tuple(ns.allow_websocket_origin or ()),
        basic=bool(ns.basic_auth or env.get(BASIC_AUTH_ENV)),
        oauth=bool(ns.oauth_provider or env.get(OAUTH_ENV)))


def check_exposure(opts: PanelOptions) -> None:
    """Refuse a dashboard that others could reach without a login: bound to a non-loopback
    address, or accepting websocket connections from pages of a non-loopback origin."""
    if opts.auth != "none":
        return
    login = ("turn on authentication: --basic-auth users.json (and --cookie-secret), or "
             "OAuth (--oauth-provider ... or PANEL_OAUTH_* variables); see docs/dashboard.md")
    if not is_loopback(opts.address):
        where = opts.address or "every interface"
        raise ConfigError(
            f"refusing to serve the dashboard on {where} without a login: anyone who can "
            f"reach it would act as the dashboard's principal. Use 127.0.0.1, or {login}")
    public = [o for o in opts.origins if not is_loopback(_origin_host(o))]
    if public:
        raise ConfigError(
            f"refusing to accept websocket connections from {', '.join(public)} without a "
            "login: a page from there could act as the dashboard's principal. Allow only "
            f"loopback origins (127.0.0.1:PORT, localhost:PORT), or {login}")


def _origin_host(origin: str) -> str:
    """The host of a ``HOST[:PORT]`` origin, split as Bokeh splits it (``[::1]:5006`` is the
    IPv6 loopback; ``*`` and ``*:PORT`` match any host)."""
    host = origin.rsplit(":", 1)[0] if ":" in origin else origin
    return host[1:-1] if host.startswith("[") and host.endswith("]") else host


def _check_basic_auth_file(path: Path) -> None:
    try:
        users = json.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise ConfigError(f"cannot read the basic-auth file {path}: {exc.strerror}") from None
    except ValueError:
        raise ConfigError(f"{path} must be JSON: {{\"alice\": \"<password>\", ...}}") from None
    if not isinstance(users, dict) or not users or not all(
            isinstance(k, str) and isinstance(v, str) and v for k, v in users.items()):
        raise ConfigError(f"{path} must map user names to non-empty passwords")
    if path.stat().st_mode & 0o077:
        raise ConfigError(f"{path} holds passwords; make it private: chmod 600 {path}")


def serve(home: str | os.PathLike | None = None, *, address: str = "127.0.0.1",
          port: int = 5006, principal: str | None = None,
          basic_auth: str | os.PathLike | None = None, cookie_secret: str | None = None,
          allow_origin: Sequence[str] | None = None, show: bool = False,
          panel_args: Sequence[str] = (), url: str | None = None) -> int:
    """Serve the dashboard until interrupted; prints the URL first. Returns the exit code."""
    cmd = serve_command(home, address=address, port=port, principal=principal,
                        basic_auth=basic_auth, cookie_secret=cookie_secret,
                        allow_origin=allow_origin, show=show, panel_args=panel_args, url=url)
    login = {"none": "no login, local only", "basic": "basic auth",
             "oauth": "OAuth"}[cmd.auth]
    print(f"keyledger dashboard: {cmd.url}  ({login})", flush=True)
    for note in cmd.notes:
        print(f"note: {note}", flush=True)
    proc = subprocess.Popen(cmd.argv, env=cmd.env)
    previous = None
    if threading.current_thread() is threading.main_thread():
        # a SIGTERM to this process stops the server too instead of orphaning it
        previous = signal.signal(signal.SIGTERM, _interrupt)
    try:
        return proc.wait()
    except KeyboardInterrupt:
        proc.terminate()
        try:
            return proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            return proc.wait()
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


__all__ = ["APP_NAME", "PanelOptions", "ServeCommand", "check_exposure", "dashboard_script",
           "is_loopback", "panel_options", "serve", "serve_command"]
