"""``demo`` and ``dashboard``: seed a demo estate (or run the tour), serve the dashboard."""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ..demo import run_tour
from ..demo_fleet import DEMO_FILE, MAX_KEYS, MAX_MONTHS, MIN_KEYS, MIN_MONTHS, seed_demo
from ..errors import ConfigError
from .common import AddCommand, UsageError, home_of, ledger_for


def cmd_demo(args: argparse.Namespace) -> int:
    if args.tour:
        with ledger_for(args) as led:
            tour = run_tour(led, echo=print)
        return 0 if tour.audit_ok else 1
    from ..config import default_home

    if args.principal:
        raise UsageError("the demo estate has fixed principals; --principal applies to --tour")
    result = seed_demo(args.home or default_home(), keys=args.keys, months=args.months,
                       seed=args.seed, progress=not args.no_progress, force=args.force,
                       echo=print)
    return 1 if result.unexpected else 0


def cmd_dashboard(args: argparse.Namespace) -> int:
    from ..dashboard.serve import serve

    if args.url is not None:  # a client of keyledger serve: no home, no PIN in this process
        from ..remote import connect

        connect(args.url).close()  # wrong credentials or URL fail here, not in the browser
        return serve(None, address=args.address, port=args.port, show=args.show,
                     allow_origin=args.allow_websocket_origin, url=args.url,
                     basic_auth=args.basic_auth, panel_args=_panel_args(args))
    home = home_of(args)
    if not (home / "keyledger.toml").exists():
        raise ConfigError(f"{home} is not a keyledger home yet; create one with `keyledger init` "
                          f"or seed a demo with `keyledger demo --home {home}`")
    _print_demo_principals(home, args.principal)
    return serve(home, address=args.address, port=args.port, principal=args.principal,
                 basic_auth=args.basic_auth, cookie_secret=args.cookie_secret,
                 allow_origin=args.allow_websocket_origin, show=args.show,
                 panel_args=_panel_args(args))


def _panel_args(args: argparse.Namespace) -> list[str]:
    panel_args = list(args.panel_args or [])
    return panel_args[1:] if panel_args[:1] == ["--"] else panel_args


def _print_demo_principals(home: Path, principal: str | None) -> None:
    """A seeded demo home names its principals: say who the dashboard acts as."""
    try:
        doc = json.loads((home / DEMO_FILE).read_text())
    except (OSError, ValueError):
        return
    people = [p for p in doc.get("principals", []) if isinstance(p, dict)]
    if people:
        print(f"demo principals: {', '.join(p['name'] for p in people[:6])}, ... "
              f"({len(people)} in {home / DEMO_FILE})")
    if principal:
        roles = next((p.get("roles") for p in people if p.get("name") == principal), None)
        print(f"signed in as {principal}" + (f" ({', '.join(roles)})" if roles else ""))


def _bounded_int(lo: int, hi: int) -> Callable[[str], int]:
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
        if not lo <= value <= hi:
            raise argparse.ArgumentTypeError(f"must be from {lo} to {hi}, not {value}")
        return value
    return parse


def register(sub: Any, add: AddCommand) -> None:
    """``demo`` and ``dashboard``."""
    p = add(sub, "demo", cmd_demo, "seed a demo estate: ~150 keys, 8 teams, 18 months of history "
            "(once per home; --tour: the short scripted lifecycle tour)")
    p.add_argument("--keys", type=_bounded_int(MIN_KEYS, MAX_KEYS), default=150, metavar="N",
                   help="keys in the estate (default 150)")
    p.add_argument("--months", type=_bounded_int(MIN_MONTHS, MAX_MONTHS), default=18, metavar="M",
                   help="months of simulated history, ending now (default 18)")
    p.add_argument("--seed", type=int, default=7, metavar="S",
                   help="random seed: the same seed gives the same estate (default 7)")
    p.add_argument("--force", action="store_true",
                   help="delete an existing demo home (one with demo.json) and seed it again")
    p.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    p.add_argument("--tour", action="store_true",
                   help="run the short scripted tour of the key lifecycle instead (re-runnable)")

    p = add(sub, "dashboard", cmd_dashboard, "serve the Panel dashboard (prints the URL; Ctrl-C "
            "stops it); no login on 127.0.0.1, basic auth or OAuth required elsewhere")
    p.add_argument("--address", default="127.0.0.1",
                   help="address to bind (default 127.0.0.1; any other needs a login)")
    p.add_argument("--port", type=_bounded_int(1, 65535), default=5006,
                   help="port (default 5006)")
    p.add_argument("--basic-auth", metavar="FILE",
                   help="JSON file of user: password (mode 0600) for Panel's basic auth")
    p.add_argument("--cookie-secret", metavar="S",
                   help="cookie secret for the login session (default: generated per run)")
    p.add_argument("--allow-websocket-origin", action="append", metavar="HOST:PORT",
                   help="extra origin allowed to connect (repeatable)")
    p.add_argument("--show", action="store_true", help="open a browser tab")
    p.add_argument("panel_args", nargs=argparse.REMAINDER,
                   help="after --: options passed to `panel serve`, e.g. --oauth-provider")
