"""Result tables: plain-text rendering for the terminal and dicts for ``--json``."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

RESULT = "result"  # the column holding PASS/MISS


class Ratio(float):
    """A ratio, shown as ``1.08x``."""

    def __str__(self) -> str:
        return f"{float(self):.2f}x"


def verdict(value: float | None, limit: float) -> str:
    """PASS when ``value`` is at most ``limit``; MISS otherwise; empty when not measured."""
    if value is None:
        return ""
    return "PASS" if value <= limit else "MISS"


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, Ratio):
        return str(value)
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, float):
        if abs(value) >= 100:
            return f"{value:,.0f}"
        if abs(value) >= 10:
            return f"{value:.1f}"
        return f"{value:.2f}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)


@dataclass
class Table:
    """One table of figures; cells are numbers (rendered compactly), Ratios, strings or None."""

    title: str
    columns: list[str]
    rows: list[list[Any]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def add(self, *cells: Any) -> None:
        if len(cells) != len(self.columns):
            raise ValueError(f"{self.title}: {len(cells)} cells for {len(self.columns)} columns")
        self.rows.append(list(cells))

    def render(self) -> str:
        text = [[_cell(c) for c in row] for row in self.rows]
        widths = [max([len(h)] + [len(r[i]) for r in text]) for i, h in enumerate(self.columns)]

        def line(cells: list[str]) -> str:
            # first column left-aligned (labels), the others right-aligned (figures)
            parts = [cells[0].ljust(widths[0])] + [c.rjust(w) for c, w in zip(cells[1:], widths[1:])]
            return "  ".join(parts).rstrip()

        out = [f"== {self.title}", line(self.columns), line(["-" * w for w in widths])]
        out += [line(r) for r in text]
        out += [f"   {n}" for n in self.notes]
        return "\n".join(out)

    def verdicts(self) -> list[tuple[str, str]]:
        """``(row label, PASS|MISS)`` for every row that has a target."""
        if RESULT not in self.columns:
            return []
        i = self.columns.index(RESULT)
        return [(str(r[0]), str(r[i])) for r in self.rows if r[i] in ("PASS", "MISS")]

    def to_json(self) -> dict[str, Any]:
        def plain(v: Any) -> Any:
            return round(float(v), 3) if isinstance(v, float) else v

        return {
            "title": self.title,
            "rows": [{c: plain(v) for c, v in zip(self.columns, row)} for row in self.rows],
            "notes": self.notes,
        }
