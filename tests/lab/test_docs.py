"""docs/lab.md quotes its reports: every table row and every line of the reference's output
on the page is a line of a report the lab (or benchmarks/xiong_reference.py) wrote."""

from pathlib import Path

DOCS = Path(__file__).parents[2] / "docs"


def quoted_lines(text: str) -> list[str]:
    """Table rows (not the header separators) and the lines of fenced blocks of figures."""
    lines, fenced, figures = [], False, False
    for line in text.splitlines():
        if line.startswith("```"):
            fenced = not fenced
            figures = False
            continue
        if fenced:
            figures = figures or line.startswith("placement")  # the reference's output
            if figures:
                lines.append(line)
        elif line.startswith("| ") and not line.startswith("|---"):
            lines.append(line)
    return lines


def test_every_figure_on_the_lab_page_is_a_reports_own_line():
    page = (DOCS / "lab.md").read_text(encoding="utf-8")
    reports = [p for p in (DOCS / "lab").rglob("*") if p.suffix in (".md", ".txt")]
    written = {line for p in reports for line in p.read_text(encoding="utf-8").splitlines()}
    quoted = quoted_lines(page)
    assert len(quoted) > 40  # the tables are there
    missing = [line for line in quoted if line not in written]
    assert not missing, f"lines of docs/lab.md that no report wrote: {missing}"
