"""Writing results: JSON files and the small formatting helpers the tables share."""

import json
import math
from typing import Dict


def write_json(path: str, doc: Dict, indent: int = 1) -> None:
    """Write ``doc`` to ``path`` as JSON and say so on stdout."""
    with open(path, "w") as f:
        json.dump(doc, f, indent=indent)
    print(f"\nwrote {path}")


def jsonable(stats: Dict) -> Dict:
    """``stats`` with every value that is not a JSON scalar turned into its string."""
    return {k: (v if isinstance(v, (int, float, str, bool)) or v is None else str(v)) for k, v in stats.items()}


def d_label(d: int) -> str:
    """``1e6`` for 10**6; plain digits for a d that is not a power of ten (and for 1)."""
    e = round(math.log10(d)) if d and d > 1 else 0
    return f"1e{e}" if e > 0 and 10 ** e == d else str(d)


def short_error(exc: BaseException) -> str:
    """``Type: first line of the message`` (at most 140 characters of it)."""
    msg = str(exc).strip().splitlines()[0][:140] if str(exc).strip() else ""
    return f"{type(exc).__name__}: {msg}"
