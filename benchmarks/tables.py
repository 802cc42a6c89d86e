"""Markdown tables shared by the benchmark scripts (run as `python benchmarks/NAME.py`,
which puts this folder on the import path)."""

from __future__ import annotations

import statistics
from collections.abc import Callable, Sequence


def number(value) -> str:
    """4 decimals below 1 (metrics, shares), thousands separators above."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return str(value)
    if isinstance(value, int):
        return f"{value:,}"
    return f"{value:.4f}" if abs(value) < 1 else f"{value:,.1f}"


def markdown(rows: Sequence[dict], columns: Sequence[str],
             cell: Callable[[str, object], str] = lambda column, value: number(value)) -> str:
    """A Markdown table of `rows` (dicts) with `columns`; `cell(column, value)` formats."""
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(c, row.get(c, "")) for c in columns) + " |" for row in rows]
    return "\n".join(lines)


def spread(values: Sequence[float]) -> str:
    """Mean ± sample standard deviation over seeds (the value alone for one seed)."""
    if len(values) == 1:  # one seed: no spread to show
        return f"{values[0]:.4f}"
    return f"{statistics.mean(values):.4f} ± {statistics.stdev(values):.4f}"
