"""Sum tests/cpuprof.py's rows per test module: CPU (the worker's own and its reaped children's)
and wall seconds, largest CPU first (docs/operations.md, "Where the time goes").

Usage: ``python scripts/test_profile.py /tmp/prof [--top 30] [--idle]``; ``--idle`` lists
the tests that were running while the machine had idle cores (``idle.json``), weighted by
the idle core-seconds they overlapped: where waiting, not work, sets the wall time.
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
    parser.add_argument("--idle", action="store_true")
    args = parser.parse_args()
    if args.idle:
        idle_report(args.folder, args.top)
        return
    modules: dict[str, list[float]] = defaultdict(lambda: [0.0, 0.0, 0.0, 0.0])
    for rows in sorted(args.folder.glob("rows-*.json")):
        for node, own, children, wall, *_ in json.loads(rows.read_text()):
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


def idle_report(folder: Path, top: int) -> None:
    """Each idle sample's idle core-seconds, shared among the tests running at that moment."""
    samples = json.loads((folder / "idle.json").read_text())
    spans = [(start, start + wall, node)
             for rows in sorted(folder.glob("rows-*.json"))
             for node, _own, _children, wall, start in json.loads(rows.read_text())]
    blame: dict[str, float] = defaultdict(float)
    total = unowned = 0.0
    previous = samples[0][0] - 0.5 if samples else 0.0
    for when, idle_cores in samples:
        idle_s = idle_cores * (when - previous)
        previous = when
        total += idle_s
        running = [node for start, end, node in spans if start < when and end > when - 0.5]
        for node in running:
            blame[node] += idle_s / len(running)
        if not running:
            unowned += idle_s
    print(f"idle core-seconds: {total:.0f} over {len(samples) / 2:.0f} s; "
          f"{unowned:.0f} with no test running (start-up, collection, the end)")
    for node, s in sorted(blame.items(), key=lambda kv: -kv[1])[:top]:
        print(f"{s:7.1f}  {node}")


if __name__ == "__main__":
    main()
