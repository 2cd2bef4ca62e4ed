"""attnrules: explain the features of transformer attention heads as human-readable rules."""
from __future__ import annotations

__version__ = "0.1.0"
