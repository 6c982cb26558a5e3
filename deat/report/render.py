"""A table to Markdown, LaTeX and CSV through pandas' own writers (``DataFrame.to_markdown`` via tabulate,
``Styler.to_latex``, ``DataFrame.to_csv``). The study's protocol is not repeated: every Markdown and LaTeX table
links to ``protocol.md``, and CSVs hold the table alone so that ``pandas.read_csv(path)`` loads them."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from .protocol import PROTOCOL_FILE


@dataclass
class Table:
    """A table as display strings with a one-line ``caption``. ``columns`` name the columns in Markdown and CSV;
    LaTeX prints ``groups`` (label, span) above ``subcolumns`` when given. ``empty_message`` replaces a table
    without rows."""

    name: str
    caption: str
    columns: list[str]
    rows: list[list[str]]
    notes: list[str] = field(default_factory=list)
    groups: list[tuple[str, int]] | None = None
    subcolumns: list[str] | None = None
    empty_message: str = ""

    def frame(self) -> pd.DataFrame:
        return pd.DataFrame(self.rows, columns=self.columns, dtype=str)


def _numeric(cell: str) -> bool:
    """A cell that reads as a number ("41.40 ± 0.28†", "+1.20", "—", "[-1.0, +2.0]"): right-aligned."""
    return cell == "" or cell[0] in "0123456789+-−—["


def to_markdown(table: Table) -> str:
    lines = [f"**{table.caption}** (protocol: [{PROTOCOL_FILE}]({PROTOCOL_FILE}))", ""]
    if table.rows:
        frame = table.frame()
        align = ["right" if all(_numeric(cell) for cell in frame[column]) else "left" for column in frame]
        lines.append(frame.to_markdown(index=False, colalign=align, disable_numparse=True))
    else:
        lines.append(table.empty_message)
    for note in table.notes:
        lines += ["", note]
    return "\n".join(lines) + "\n"


# After pandas' LaTeX escaping (specials such as _ % &): the few non-ASCII symbols the tables use, typeset.
_LATEX_SYMBOLS = {
    "±": r"$\pm$", "—": "---", "−": "$-$", "†": r"\textsuperscript{\dag}", "§": r"\textsuperscript{\S}", "‡": r"\textsuperscript{\ddag}",
    "ᵃ": r"\textsuperscript{a}", "ᵇ": r"\textsuperscript{b}", "Δ": r"$\Delta$", "α": r"$\alpha$", "ρ": r"$\rho$",
    "τ": r"$\tau$", "ε": r"$\varepsilon$", "√": r"$\surd$", "²": r"\textsuperscript{2}", "×": r"$\times$",
    "≈": r"$\approx$", "≥": r"$\geq$", "≤": r"$\leq$", "…": r"\ldots{}",
}
_SYMBOLS = re.compile("|".join(map(re.escape, _LATEX_SYMBOLS)))


def latex_symbols(text: str) -> str:
    """Typeset the non-ASCII symbols of already LaTeX-escaped text."""
    return _SYMBOLS.sub(lambda match: _LATEX_SYMBOLS[match.group()], text)


def latex_escape(text: str) -> str:
    """LaTeX-escape text with pandas' escaping (the Styler's ``escape="latex"``), then typeset the symbols."""
    escaped = pd.DataFrame([[text]]).style.format(escape="latex").to_latex()
    cell = escaped.split("\n")[2].split(" & ", 1)[1].removesuffix(r" \\")  # the one body row, after its index
    return latex_symbols(cell)


def to_latex(table: Table, study: str) -> str:
    label = re.sub(r"[^A-Za-z0-9-]", "-", f"{study}-{table.name}")
    caption = latex_escape(table.caption)
    notes = [latex_escape(note) for note in table.notes] + [
        f"Protocol: {latex_escape(PROTOCOL_FILE)} of study {latex_escape(study)}."]
    if table.rows:
        frame = table.frame()
        if table.groups:
            frame.columns = pd.MultiIndex.from_arrays(
                [[group for group, span in table.groups for _ in range(span)], table.subcolumns or table.columns])
        styler = frame.style.hide(axis="index")
        styler = styler.format(escape="latex", formatter=latex_symbols)
        styler = styler.format_index(escape="latex", formatter=latex_symbols, axis="columns")
        body = styler.to_latex(column_format="l" + "r" * (len(table.columns) - 1), hrules=True,
                               multicol_align="c", clines=None)
        if table.groups:  # booktabs rules under each named group of columns
            start, rules = 1, []
            for group, span in table.groups:
                if group:
                    rules.append(rf"\cmidrule(lr){{{start}-{start + span - 1}}}")
                start += span
            lines = body.split("\n")
            lines.insert(3, " ".join(rules))  # after \begin{tabular}, \toprule and the group row
            body = "\n".join(lines)
    else:
        body = latex_escape(table.empty_message) + r"\par" + "\n"
    return "\n".join([f"% {table.name} of study {study}, written by python -m deat report; needs booktabs.",
                      r"\begin{table}[htbp]", r"\centering", rf"\caption{{{caption}}}", rf"\label{{tab:{label}}}",
                      body.rstrip("\n"), r"\par\smallskip", r"{\footnotesize " + r"\par ".join(notes) + r"\par}",
                      r"\end{table}"]) + "\n"


def to_csv(table: Table) -> str:
    """The table alone (header and rows): ``pandas.read_csv(path)`` loads it with no options."""
    return table.frame().to_csv(index=False, lineterminator="\n")


def write_table(table: Table, study: str, tables_dir: Path) -> list[Path]:
    paths = []
    for suffix, text in ((".md", to_markdown(table)), (".tex", to_latex(table, study)), (".csv", to_csv(table))):
        path = tables_dir / f"{table.name}{suffix}"
        path.write_text(text, encoding="utf-8")
        paths.append(path)
    return paths
