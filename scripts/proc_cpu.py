"""Where a command's CPU goes, counting every process, reaped or not (Linux).

``time`` and ``tests/cpuprof.py`` count the CPU of the processes a command waits for; a test
run also pays for processes it never reaps (Chromium's renderers, Jupyter kernels, servers).
This runs the command, reads ``/proc/<pid>/stat`` of every process every ``--every`` seconds,
and prints the machine's busy and idle core-seconds (``/proc/stat``) and the CPU of the
processes that ran, grouped by what they run. A process that starts and ends between two
samples is missed, and one that ends counts up to its last sample: the machine's busy time
is the complete figure, the groups say where most of it went.

Usage: ``python scripts/proc_cpu.py [--every 0.25] [--top 25] -- make test``
"""

from __future__ import annotations

import argparse
import collections
import os
import subprocess
import sys
import time

TICK = os.sysconf("SC_CLK_TCK")


def machine() -> list[int]:
    with open("/proc/stat") as fh:
        return [int(x) for x in fh.readline().split()[1:]]


def scan(seen: dict[tuple[str, int], list], first: bool) -> None:
    """Each live process's (name, CPU seconds at its first and its latest sample)."""
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            with open(f"/proc/{pid}/stat") as fh:
                stat = fh.read()
            fields = stat[stat.rindex(")") + 2:].split()
            cpu = (int(fields[11]) + int(fields[12])) / TICK
            key = (pid, int(fields[19]))  # pid and start time: pids are reused
            if key not in seen:
                with open(f"/proc/{pid}/cmdline", "rb") as fh:
                    argv = fh.read().split(b"\0")
                seen[key] = [label(stat[stat.index("(") + 1:stat.rindex(")")], argv),
                             cpu if first else 0.0, cpu]
            seen[key][2] = cpu
        except (OSError, ValueError, IndexError):  # it ended meanwhile
            continue


def label(comm: str, argv: list[bytes]) -> str:
    """A process's group: its name, or for an interpreter what it runs (``-m module``,
    ``-c`` code's first line, or the script)."""
    args = [a.decode(errors="replace") for a in argv if a]
    if not comm.startswith("python") or len(args) < 2:
        return comm
    if args[1] in ("-m", "-c") and len(args) > 2:
        return f"python {args[1]} {args[2].strip().splitlines()[0][:60]}"
    return f"python {os.path.basename(args[1])}"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--every", type=float, default=0.25, help="seconds between samples (0.25)")
    p.add_argument("--top", type=int, default=25, help="groups to print (25)")
    p.add_argument("command", nargs=argparse.REMAINDER, help="the command, after --")
    args = p.parse_args(argv)
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        p.error("give the command to run after --")
    seen: dict[tuple[str, int], list] = {}
    scan(seen, first=True)
    before, t0 = machine(), time.monotonic()
    proc = subprocess.Popen(command)
    while proc.poll() is None:
        scan(seen, first=False)
        time.sleep(args.every)
    wall, after = time.monotonic() - t0, machine()
    busy = [(b - a) / TICK for a, b in zip(before, after, strict=True)]
    groups: collections.Counter[str] = collections.Counter()
    counts: collections.Counter[str] = collections.Counter()
    for name, start, last in seen.values():
        groups[name] += last - start
        counts[name] += 1
    print(f"wall {wall:.1f} s; machine: user {busy[0] + busy[1]:.1f}, system {busy[2]:.1f}, "
          f"idle {busy[3] + busy[4]:.1f}, steal {busy[7]:.1f} core-seconds", file=sys.stderr)
    print(f"{'CPU s':>8} {'procs':>5}  group", file=sys.stderr)
    for name, cpu in groups.most_common(args.top):
        print(f"{cpu:8.1f} {counts[name]:5d}  {name}", file=sys.stderr)
    print(f"{sum(groups.values()):8.1f} {sum(counts.values()):5d}  all sampled processes",
          file=sys.stderr)
    return proc.returncode


if __name__ == "__main__":
    sys.exit(main())
