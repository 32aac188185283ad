"""Sum tests/cpuprof.py's rows per test module: CPU (the worker's own and its reaped children's)
and wall seconds, largest CPU first (docs/operations.md, "Where the time goes").

Usage: ``python scripts/test_profile.py /tmp/prof [--top 30]``
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folder", type=Path)
    parser.add_argument("--top", type=int, default=30)
    args = parser.parse_args()
    modules: dict[str, list[float]] = defaultdict(lambda: [0.0, 0.0, 0.0, 0.0])
    for rows in sorted(args.folder.glob("rows-*.json")):
        for node, own, children, wall in json.loads(rows.read_text()):
            totals = modules[node.split("::")[0].split("/")[-1]]
            totals[0] += own
            totals[1] += children
            totals[2] += wall
            totals[3] += 1
    own = sum(t[0] for t in modules.values())
    children = sum(t[1] for t in modules.values())
    print(f"{len(modules)} modules: {own:.0f} s CPU in pytest, {children:.0f} s in children")
    print(f"{'module':34} {'tests':>5} {'own':>7} {'child':>7} {'cpu':>7} {'wall':>7}")
    ranked = sorted(modules.items(), key=lambda kv: -(kv[1][0] + kv[1][1]))
    for name, (o, c, w, n) in ranked[:args.top]:
        print(f"{name:34} {int(n):5} {o:7.1f} {c:7.1f} {o + c:7.1f} {w:7.1f}")


if __name__ == "__main__":
    main()
