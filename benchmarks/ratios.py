"""Print ratios, not lone timings, from a pytest-benchmark JSON file.

    .venv/bin/pytest benchmarks/bench_memory.py --benchmark-only \\
        --benchmark-json=.benchmarks/memory.json
    .venv/bin/python benchmarks/ratios.py .benchmarks/memory.json

Rows are paired through the ``extra_info`` that ``AsyncBench.describe`` (conftest.py)
writes: an ``ours`` row with ``compare="read"`` is divided by the ``baseline`` and
``peer`` rows whose ``op`` is ``"read"``, in the same ``suite`` at the same ``stored``
size. A ratio is a speed ratio, baseline time / our time (= our ops/s / baseline ops/s):
0.5x means half the baseline's throughput, 2x means twice the peer's.

``targets`` on a row: ``baseline`` / ``peer`` are minimum speed ratios; any other key
names an ``extra_info`` number that must not exceed it (``max_stall_ms``...), or, given
as ``{"min": x}``, must reach it (``get_vs_peer``...).
Exit status is 1 when a target is missed, so the script can gate a CI job.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict
from pathlib import Path
from typing import Any

SPEED_TARGETS = ("baseline", "peer")


class Row:
    def __init__(self, bench: dict[str, Any]) -> None:
        info = bench.get("extra_info", {})
        self.info: dict[str, Any] = info
        self.suite: str = info.get("suite", "?")
        self.role: str = info.get("role", "ours")
        self.op: str = info.get("op", bench["name"])
        self.label: str = info.get("label", bench["name"])
        self.compare: str | None = info.get("compare")
        self.stored: int | None = info.get("stored")
        self.targets: dict[str, Any] = info.get("targets", {})
        ops = info.get("ops_per_round", 1)
        stats = bench["stats"]
        self.median_us = stats["median"] / ops * 1e6
        self.min_us = stats["min"] / ops * 1e6

    def time(self, stat: str) -> float:
        return self.median_us if stat == "median" else self.min_us


def _fmt_us(us: float) -> str:
    return f"{us:9.2f}" if us < 10_000 else f"{us:9.0f}"


def _times(row: Row) -> str:
    return f"     {_fmt_us(row.median_us)} {_fmt_us(row.min_us)}   "


def _verdict(value: float, target: float | None, at_least: bool) -> str:
    if target is None:
        return ""
    ok = value >= target if at_least else value <= target
    return f" {'ok' if ok else 'MISSED'} ({'>=' if at_least else '<='}{target:g})"


def report(rows: list[Row], stat: str) -> tuple[list[str], int]:
    """The lines to print and how many targets were missed."""
    out: list[str] = []
    missed = 0
    by_place: dict[tuple[str, int | None], list[Row]] = defaultdict(list)
    for row in rows:
        by_place[(row.suite, row.stored)].append(row)

    for (suite, stored), place in sorted(
        by_place.items(), key=lambda kv: (kv[0][0], kv[0][1] or 0)
    ):
        timed = [r for r in place if "ops_per_round" in r.info]
        if not timed:
            continue
        where = f"{suite}" + (f" @ {stored:,} stored" if stored is not None else "")
        out.append(
            f"\n== {where}   (us/op: median, min; ratio = reference time / our time, by {stat})"
        )
        refs = [r for r in timed if r.role in ("baseline", "peer")]
        families = sorted(
            {r.compare or r.op for r in timed if r.role == "ours"} | {r.op for r in refs}
        )
        for family in families:
            ours = [r for r in timed if r.role == "ours" and (r.compare or r.op) == family]
            family_refs = [r for r in refs if r.op == family]
            out.append(f"  -- {family}")
            for ref in family_refs:
                out.append(f"{_times(ref)}[{ref.role}] {ref.label}")
            for row in ours:
                parts = []
                for ref in family_refs:
                    ratio = ref.time(stat) / row.time(stat)
                    target = row.targets.get(ref.role)
                    verdict = _verdict(ratio, target, at_least=True)
                    missed += "MISSED" in verdict
                    parts.append(f"{ratio:.2f}x {ref.role}{verdict}")
                tail = ("   " + ", ".join(parts)) if parts else ""
                out.append(
                    f"     {_fmt_us(row.median_us)} {_fmt_us(row.min_us)}   {row.label}{tail}"
                )
        for row in timed:
            if row.role == "harness":
                out.append(
                    f"     {_fmt_us(row.median_us)} {_fmt_us(row.min_us)}   [harness] {row.label}"
                )

    # scaling: the same row at several stored sizes
    series: dict[tuple[str, str, str], dict[int, Row]] = defaultdict(dict)
    for row in rows:
        if row.stored is not None and "ops_per_round" in row.info:
            series[(row.suite, row.role, row.label)][row.stored] = row
    scaled = {k: v for k, v in series.items() if len(v) > 1}
    if scaled:
        out.append(
            f"\n== scaling with stored sessions (us/op by {stat}; growth = largest / smallest)"
        )
        for (suite, role, label), points in sorted(scaled.items()):
            sizes = sorted(points)
            times = [points[n].time(stat) for n in sizes]
            cells = "  ".join(f"{n:>9,}: {t:8.2f}" for n, t in zip(sizes, times, strict=True))
            tag = "" if role == "ours" else f"[{role}] "
            out.append(f"  {suite:<7} {cells}   growth {times[-1] / times[0]:5.2f}x  {tag}{label}")

    # other targets: numbers a row reports in extra_info (stall, memory)
    checks = [r for r in rows if any(k not in SPEED_TARGETS for k in r.targets)]
    if checks:
        out.append("\n== other targets")
        for row in checks:
            for key, target in row.targets.items():
                if key in SPEED_TARGETS:
                    continue
                value = row.info.get(key)
                if value is None:
                    out.append(f"  {row.suite} {row.label}: {key} not reported")
                    missed += 1
                    continue
                at_least = isinstance(target, dict)
                limit = float(target["min"]) if isinstance(target, dict) else float(target)
                verdict = _verdict(float(value), limit, at_least=at_least)
                missed += "MISSED" in verdict
                out.append(f"  {row.suite} {row.label}: {key} = {float(value):,.2f}{verdict}")
    for row in rows:
        shown = {
            k: v
            for k, v in row.info.items()
            if k
            not in ("suite", "role", "op", "label", "targets", "compare", "stored", "ops_per_round")
            and k not in row.targets
            and isinstance(v, int | float)
            and "ops_per_round" not in row.info
        }
        if shown:
            details = ", ".join(
                f"{k}={v:,.2f}" if isinstance(v, float) else f"{k}={v:,}" for k, v in shown.items()
            )
            out.append(f"  {row.suite} {row.label}: {details}")
    return out, missed


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "json", nargs="+", type=Path, help="pytest-benchmark --benchmark-json files"
    )
    parser.add_argument(
        "--stat",
        choices=("median", "min"),
        default="median",
        help="statistic the ratios and verdicts use (default: median)",
    )
    args = parser.parse_args(argv)
    try:
        rows = [Row(b) for path in args.json for b in json.loads(path.read_text())["benchmarks"]]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        # (a suite that skipped, e.g. without its extras, writes no file)
        print(f"ratios.py: cannot read the benchmark JSON: {exc}", file=sys.stderr)
        return 2
    lines, missed = report(rows, args.stat)
    print("\n".join(lines).lstrip("\n"))
    print(f"\n{missed} target(s) missed" if missed else "\nall targets met")
    return 1 if missed else 0


if __name__ == "__main__":
    sys.exit(main())
