"""Spreadsheet-safe CSV cells: text that a spreadsheet would run as a formula is written quoted.

A cell starting with ``=``, ``+``, ``-``, ``@`` (or a tab or carriage return) is a formula
to Excel, LibreOffice and Google Sheets: a photo named ``=HYPERLINK("http://x", "y").jpg``
would become a live link in the predictions file. Every CSV fairage writes passes its
text cells (and column names) through ``safe_table``, which puts a ``'`` before such a
cell, the convention spreadsheets show as plain text; a cell already starting with ``'``
gets one more, so ``unquote`` gives back exactly the text written. Numbers are untouched.
"""

from __future__ import annotations

import pandas as pd

#: first characters that make a spreadsheet read a cell as a formula
FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r")


def quote_cell(value):
    """``value`` with a leading ``'`` when it is text a spreadsheet would read as a formula (or starts with ``'``)."""
    if isinstance(value, str) and value[:1] in (*FORMULA_STARTS, "'"):
        return "'" + value
    return value


def unquote(value):
    """The text ``quote_cell`` was given (one leading ``'`` removed); anything else as it is."""
    if isinstance(value, str) and value.startswith("'"):
        return value[1:]
    return value


def safe_table(table: pd.DataFrame) -> pd.DataFrame:
    """A copy of ``table`` whose text cells and column names are spreadsheet-safe (``quote_cell``)."""
    out = table.copy()
    for column in out.columns:
        if out[column].dtype == object or pd.api.types.is_string_dtype(out[column]):
            out[column] = out[column].map(quote_cell)
    out.columns = [quote_cell(str(c)) for c in out.columns]
    return out
