"""Draw benchmark ratios as an SVG bar chart (no dependencies beyond the stdlib).

From the measured tables in the docs (rows whose first cell states a target such
as "at most 1.15x" or ">= 1.5x" and whose second cell holds the measured ratio in
bold, e.g. "233 us vs 620 us: **2.66x**", with x or the multiplication sign)::

    .venv/bin/python benchmarks/chart.py --markdown docs/benchmarks.md \\
        -o docs/img/benchmark-ratios.svg

or from pytest-benchmark JSON files, pairing rows as ``ratios.py`` does (speed ratio =
reference time / our time, one bar per our row and reference, targets from the rows)::

    .venv/bin/python benchmarks/chart.py .benchmarks/memory.json -o memory.svg

Each bar is a ratio; a tick marks its target and the colour says whether it was met.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from dataclasses import dataclass
from html import escape
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from ratios import Row

MET, MISSED, NONE = "#2e7d32", "#c62828", "#546e7a"
TIMES = "\u00d7"  # the multiplication sign of "2.66x"


@dataclass
class Bar:
    label: str
    value: float  # the ratio
    target: float | None = None
    at_least: bool = True  # the ratio must be >= target (else <=)
    section: str = ""

    @property
    def colour(self) -> str:
        if self.target is None:
            return NONE
        ok = self.value >= self.target if self.at_least else self.value <= self.target
        return MET if ok else MISSED


# ------------------------------------------------------------------ markdown

_RATIO = re.compile(r"\*\*([0-9]+(?:\.[0-9]+)?)\s*[\u00d7x]\*\*")
_TARGET = re.compile(
    r"(\u2265|>=|at least|\u2264|<=|at most)\s*([0-9]+(?:\.[0-9]+)?)\s*(%|[\u00d7x])?",
    re.IGNORECASE,
)


_AT_PAR = re.compile(r"(\u2265|>=)\s*(starsessions|raw)\b", re.IGNORECASE)


def from_markdown(text: str) -> list[Bar]:
    """Bars from table rows whose second cell holds a bold ratio (``**2.66x**``); the
    target (``>= 1.5x``, ``at most 2x``, with the Unicode signs too) is read from the
    first cell."""
    bars: list[Bar] = []
    section = ""
    for line in text.splitlines():
        if line.startswith("## "):
            section = line[3:].strip()
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if not line.lstrip().startswith("|") or len(cells) < 2:
            continue
        ratio = _RATIO.search(cells[1])
        if ratio is None:
            continue
        label = re.sub(r"[`*]", "", cells[0])
        bar = Bar(label, float(ratio.group(1)), section=section)
        target = _TARGET.search(cells[0])
        if target is not None and target.group(3) != "%":
            bar.target = float(target.group(2))
            bar.at_least = target.group(1).lower() in ("\u2265", ">=", "at least")
        elif _AT_PAR.search(cells[0]):  # "x >= starsessions write": at least 1x
            bar.target = 1.0
        bars.append(bar)
    return bars


# ---------------------------------------------------------------------- json


def from_json(paths: list[Path], stat: str) -> list[Bar]:
    """One bar per (our row, reference row) pair, as ``ratios.py`` pairs them."""
    rows = [Row(b) for path in paths for b in json.loads(path.read_text())["benchmarks"]]
    timed = [r for r in rows if "ops_per_round" in r.info]
    bars = []
    for row in timed:
        if row.role != "ours":
            continue
        family = row.compare or row.op
        for ref in timed:
            if (
                ref.role in ("baseline", "peer")
                and ref.op == family
                and (ref.suite, ref.stored) == (row.suite, row.stored)
            ):
                where = f" @ {row.stored:,}" if row.stored is not None else ""
                bars.append(
                    Bar(
                        f"{row.label} vs {ref.role}{where}",
                        ref.time(stat) / row.time(stat),
                        row.targets.get(ref.role),
                        section=row.suite,
                    )
                )
    return bars


# ----------------------------------------------------------------------- svg


def render(bars: list[Bar], title: str) -> str:
    """A horizontal bar chart: label on the left, bar, value, target tick."""
    label_w, bar_w, row_h, top, value_w = 470, 340, 26, 56, 60
    sections = []
    for bar in bars:
        if bar.section not in sections:
            sections.append(bar.section)
    heading_rows = sum(1 for s in sections if s)
    height = top + row_h * (len(bars) + heading_rows) + 28
    width = label_w + bar_w + value_w + 20
    scale_max = max([1.0] + [b.value for b in bars] + [b.target or 0 for b in bars]) * 1.1
    x0 = label_w

    def x(value: float) -> float:
        return x0 + bar_w * value / scale_max

    out = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
        f'viewBox="0 0 {width} {height}" font-family="system-ui, sans-serif" font-size="12">',
        f"<title>{escape(title)}</title>",
        f'<rect width="{width}" height="{height}" fill="#ffffff"/>',
        f'<text x="10" y="22" font-size="15" font-weight="bold">{escape(title)}</text>',
        f'<text x="10" y="40" fill="#555">bar: measured ratio; tick: target; '
        f'<tspan fill="{MET}">met</tspan>, <tspan fill="{MISSED}">missed</tspan>, '
        f'<tspan fill="{NONE}">no target</tspan></text>',
    ]
    y = top
    for section in sections:
        if section:
            out.append(
                f'<text x="10" y="{y + 17}" font-weight="bold" fill="#333">{escape(section)}</text>'
            )
            y += row_h
        for bar in (b for b in bars if b.section == section):
            label = bar.label if len(bar.label) <= 66 else bar.label[:65] + "…"
            out.append(
                f'<text x="{label_w - 8}" y="{y + 17}" text-anchor="end">{escape(label)}</text>'
            )
            out.append(
                f'<rect x="{x0}" y="{y + 5}" width="{max(x(bar.value) - x0, 1):.1f}" '
                f'height="{row_h - 10}" fill="{bar.colour}"/>'
            )
            end = max(x(bar.value), x(bar.target) if bar.target is not None else 0.0)
            out.append(f'<text x="{end + 6:.1f}" y="{y + 17}">{bar.value:.2f}{TIMES}</text>')
            if bar.target is not None:
                tx = x(bar.target)
                sign = "≥" if bar.at_least else "≤"
                out.append(
                    f'<line x1="{tx:.1f}" x2="{tx:.1f}" y1="{y + 2}" y2="{y + row_h - 2}" '
                    f'stroke="#111" stroke-width="2"><title>target {sign} {bar.target:g}{TIMES}'
                    "</title></line>"
                )
            y += row_h
    one = x(1.0)
    out.append(
        f'<line x1="{one:.1f}" x2="{one:.1f}" y1="{top}" y2="{y}" stroke="#999" '
        'stroke-dasharray="4 3"/>'
    )
    out.append(f'<text x="{one:.1f}" y="{y + 16}" text-anchor="middle" fill="#555">1{TIMES}</text>')
    out.append("</svg>")
    return "\n".join(out) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("json", nargs="*", type=Path, help="pytest-benchmark JSON files")
    parser.add_argument("--markdown", type=Path, help="a page with measured ratio tables")
    parser.add_argument("-o", "--output", type=Path, required=True, help="SVG file to write")
    parser.add_argument("--title", default="asyncsession benchmark ratios")
    parser.add_argument("--stat", choices=("median", "min"), default="median")
    args = parser.parse_args(argv)
    bars: list[Bar] = []
    if args.markdown:
        bars += from_markdown(args.markdown.read_text(encoding="utf-8"))
    if args.json:
        bars += from_json(args.json, args.stat)
    if not bars:
        print("chart.py: no ratios found in the inputs", file=sys.stderr)
        return 1
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(render(bars, args.title), encoding="utf-8")
    print(f"wrote {args.output} ({len(bars)} bars)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
