"""How numbers and text are shown: rounding for people (never scientific notation: tables get parsed),
Markdown escaping that keeps a caption's raw HTML from reaching viewers that render it."""
from __future__ import annotations

import math
import re
from typing import Any

from avg.report.model import MISSING
from avg.timing import END_TO_END


def finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def as_number(value: Any) -> float | None:
    """JSON numbers, and the strings Sacred/json use for non-finite floats."""
    if isinstance(value, bool) or value is None:
        return None
    if isinstance(value, (int, float)):
        return float(value)
    if isinstance(value, str) and value.strip().lower() in ("inf", "infinity", "+inf"):
        return math.inf
    return None


def end_to_end(metrics: dict, key: str) -> Any:
    """A timing as a user meets it: a caption in, a ranking out (design.md §6 compares like with like).

    The dense eval keeps its search-only figures under the plain keys and the end-to-end ones (the caption
    embedded by the features step's text encoder, then the search) under ``*_end_to_end``; a generative
    method's plain figures are end to end already (the caption is what it decodes from)."""
    value = metrics.get(END_TO_END[key])
    return value if value is not None else metrics.get(key)


def fmt_number(value: Any) -> str:
    """Rounded for people, never in scientific notation, no thousands separators (tables get parsed)."""
    v = as_number(value)
    if v is None:
        return MISSING
    if math.isinf(v):
        return "inf"
    if math.isnan(v):
        return "nan"
    if isinstance(value, int):
        return str(value)
    a = abs(v)
    if a >= 100:
        return f"{v:.0f}"
    if a >= 1:
        return f"{v:.2f}"
    if a == 0:
        return "0"
    decimals = max(2, 2 - int(math.floor(math.log10(a))))    # 3 significant digits
    return f"{v:.{decimals}f}"


def fmt_percent(value: Any, decimals: int = 1) -> str:
    v = as_number(value)
    return MISSING if v is None or not math.isfinite(v) else f"{100 * v:.{decimals}f}"


def fmt_mean_sd(mean: float | None, sd: float | None, decimals: int, missing: str = MISSING) -> str:
    """A spread cell of the bench and README tables: ``mean ± sd``, just ``mean`` where there is no sd (one
    split), ``missing`` where there is no mean."""
    if mean is None:
        return missing
    return f"{mean:.{decimals}f}" + ("" if sd is None else f" ± {sd:.{decimals}f}")


def fmt_yes_no(flag: bool | None, missing: str = MISSING) -> str:
    """A flag cell (e.g. whether a ranking used the dense score): yes, no, or ``missing`` where unknown."""
    return {True: "yes", False: "no"}.get(flag, missing)


def fmt_levels(values: Any) -> str:
    if not isinstance(values, (list, tuple)) or not values:
        return MISSING
    return " / ".join(fmt_percent(v) for v in values)


def _md_escape(text: str) -> str:
    """Text for a Markdown line or table cell: raw HTML in a caption must not reach viewers that render it."""
    return (str(text).replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
            .replace("|", "\\|").replace("\n", " "))


def _md_code(text: str) -> str:
    """A Markdown code span that holds any text, backticks included (CommonMark: a longer fence)."""
    text = str(text).replace("\n", " ")
    run = max((len(r) for r in re.findall(r"`+", text)), default=0)
    fence = "`" * (run + 1)
    pad = " " if text.startswith("`") or text.endswith("`") else ""
    return f"{fence}{pad}{text}{pad}{fence}".replace("|", "\\|")


def _yaml(obj: Any) -> str:
    import yaml

    return yaml.safe_dump(obj, sort_keys=True, default_flow_style=False, allow_unicode=True).rstrip()
