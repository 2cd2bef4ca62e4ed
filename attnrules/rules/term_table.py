"""Rule terms as text a reader scans: the rule, then A, V and A×V (or the exact importance) in aligned
columns, leaving out the terms that cannot contribute to a prediction (and saying how many).

Stored results keep every term; this is how they are printed (``HeadResult.summary``) and shown.
"""
from __future__ import annotations

from typing import Optional, Sequence


def can_contribute(attn_score: Optional[float], value_score: Optional[float], weight: Optional[float] = None,
                   offsets: Optional[str] = None) -> bool:
    """Whether a stored term can ever raise a prediction: its weight (exact importance) or A×V is nonzero
    and, on a rotary head, it fires at some offset. REF's exp(A)·V ordering keeps terms with A = 0 (exp(0)·V
    ranks them by V), which never fire."""
    if offsets == "none":
        return False
    if weight is not None:
        return weight != 0
    return attn_score is not None and value_score is not None and attn_score * value_score != 0


def term_rows(terms: Sequence, feature_name: str, limit: Optional[int] = None
              ) -> tuple[list[tuple[str, Optional[float], Optional[float], Optional[float]]], str, int]:
    """Stored terms (objects with ``query_desc``, ``key_desc``, ``attn_score``, ``value_score``, ``weight``,
    ``offsets``, like :class:`~attnrules.pipeline.results.RuleTerm`) that can contribute
    (:func:`can_contribute`), the first ``limit`` of them, as (rule text, A, V, A×V or the exact importance);
    the name of that last column ("A×V" or "importance"); and how many terms were left out."""
    shown = [t for t in terms if can_contribute(t.attn_score, t.value_score, t.weight, t.offsets)]
    left_out = len(terms) - len(shown)
    exact = any(t.weight is not None for t in shown)
    rows = []
    for t in shown[:limit]:
        at = t.offsets or "any"
        gap = {"any": "…", "none": "…(never)…"}.get(at, f"…({at})…")
        last = t.weight if exact else t.attn_score * t.value_score
        rows.append((f"[{t.key_desc}] {gap} [{t.query_desc}] → {feature_name}", t.attn_score, t.value_score, last))
    return rows, "importance" if exact else "A×V", left_out


def term_table(terms: Sequence, feature_name: str, limit: Optional[int] = None) -> tuple[list[str], int]:
    """:func:`term_rows` as text: a header, then one line per term, the rule and then A, V and A×V (or the
    importance) in aligned columns. Returns the lines (none when no term can contribute) and how many
    terms were left out."""
    rows, last, left_out = term_rows(terms, feature_name, limit)
    if not rows:
        return [], left_out
    width = max(len(r[0]) for r in rows)
    titles = ("A", "V", last)
    cells = [tuple(format_number(x) for x in r[1:]) for r in rows]
    widths = [max(len(h), *(len(c[i]) for c in cells)) for i, h in enumerate(titles)]
    header = " " * width + "  " + "  ".join(h.rjust(w) for h, w in zip(titles, widths))
    return [header] + [r[0].ljust(width) + "  " + "  ".join(c.rjust(w) for c, w in zip(cell, widths))
                       for r, cell in zip(rows, cells)], left_out


def format_number(value: Optional[float]) -> str:
    """A term's number as shown: 4 significant digits, "—" when undefined."""
    return "—" if value is None else f"{value:.4g}"
