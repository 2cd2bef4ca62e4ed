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


def term_table(terms: Sequence, feature_name: str, limit: Optional[int] = None) -> tuple[list[str], int]:
    """Stored terms (objects with ``query_desc``, ``key_desc``, ``attn_score``, ``value_score``, ``weight``,
    ``offsets``, like :class:`~attnrules.pipeline.results.RuleTerm`) as a header and one line per term, the
    rule then A, V and A×V (or the exact importance) in aligned columns; terms that cannot contribute
    (:func:`can_contribute`) are left out. Returns the lines and how many terms were left out."""
    shown = [t for t in terms if can_contribute(t.attn_score, t.value_score, t.weight, t.offsets)]
    left_out = len(terms) - len(shown)
    shown = shown[:limit]
    if not shown:
        return [], left_out
    exact = any(t.weight is not None for t in shown)
    rules = []
    for t in shown:
        at = t.offsets or "any"
        gap = {"any": "…", "none": "…(never)…"}.get(at, f"…({at})…")
        rules.append(f"[{t.key_desc}] {gap} [{t.query_desc}] → {feature_name}")
    width = max(len(r) for r in rules)
    last = "importance" if exact else "A×V"
    cells = [(_num(t.attn_score), _num(t.value_score),
              _num(t.weight if exact else t.attn_score * t.value_score)) for t in shown]
    widths = [max(len(h), *(len(c[i]) for c in cells)) for i, h in enumerate(("A", "V", last))]
    header = " " * width + "  " + "  ".join(h.rjust(w) for h, w in zip(("A", "V", last), widths))
    return [header] + [r.ljust(width) + "  " + "  ".join(c.rjust(w) for c, w in zip(cell, widths))
                       for r, cell in zip(rules, cells)], left_out


def _num(value: Optional[float]) -> str:
    return "—" if value is None else f"{value:.4g}"
