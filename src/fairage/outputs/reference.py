"""Published figures to set beside fairage's own: the seed report's Table 1 and its Keras kit.

These numbers were measured by others on APPA-REAL's test set; fairage did not measure
them and cannot reproduce them without that data. They are shown next to a comparison
table (``fairage report --reference seed``) only as a point of reference, clearly marked.
"""

from __future__ import annotations

import pandas as pd

from ..errors import ConfigError

#: the caption every display of these figures carries
PUBLISHED_NOTE = "published figures on APPA-REAL (seed report), not measured by fairage"

#: (model, MAE, age bias, gender bias, ethnicity bias, expression bias), years; None = not published
SEED_REPORT_ROWS: tuple[tuple[str, float, float | None, float | None, float | None, float | None], ...] = (
    ("kit stage I only", 16.99, None, None, None, None),
    ("kit stage II", 11.14, 8.99, 0.628, 2.448, 0.820),
    ("kit stage II + augmentation", 10.29, 5.78, None, None, None),
    ("kit stage II + age weights", 12.45, 3.97, 0.549, 2.094, 1.221),
    ("report M1", 9.59, 5.45, 0.137, 2.8, 2.35),
    ("report M2", 7.35, 4.39, 0.058, 4.8, 1.78),
    ("report M3", 6.67, 3.52, 0.037, 2.352, 1.45),
    ("report M4", 6.94, 3.16, 0.26, 2.352, 1.15),
    ("report M5", 8.01, 2.85, 0.12, 0.322, 0.78),
)

#: reference name -> its rows
REFERENCES = {"seed": SEED_REPORT_ROWS}


def reference_table(name: str = "seed") -> pd.DataFrame:
    """A published table in the comparison table's column names (years; NaN = not published).

    Columns: Model, Gender bias, Expression bias, Ethnicity bias, Age bias, MAE.

    >>> row = reference_table("seed").iloc[4]
    >>> row["Model"], float(row["MAE"]), float(row["Age bias"])
    ('report M1', 9.59, 5.45)
    """
    if name not in REFERENCES:
        raise ConfigError(f"unknown reference {name!r}; available: {', '.join(REFERENCES)}")
    rows = [
        {
            "Model": model,
            "Gender bias": gender,
            "Expression bias": expression,
            "Ethnicity bias": ethnicity,
            "Age bias": age,
            "MAE": mae,
        }
        for model, mae, age, gender, ethnicity, expression in REFERENCES[name]
    ]
    return pd.DataFrame(rows).astype(
        {c: float for c in ("Gender bias", "Expression bias", "Ethnicity bias", "Age bias", "MAE")}
    )


def reference_display(name: str = "seed") -> pd.DataFrame:
    """``reference_table(name)`` as text: each figure as published, ``-`` where none was.

    >>> reference_display("seed").iloc[0].tolist()
    ['kit stage I only', '-', '-', '-', '-', '16.99']
    """
    table = reference_table(name)
    shown = table.astype(object)
    for column in table.columns[1:]:
        shown[column] = ["-" if pd.isna(v) else f"{v:g}" for v in table[column]]
    return shown
