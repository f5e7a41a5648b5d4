"""The SVD report: what a rank reduction kept of one module (``mix``, ``convert --rank``, ``merge --rank``).
Standard library only, so results that carry it import nothing heavy.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class SvdReport:
    """What an SVD kept of one module: ``energy`` = Σσ²(kept) / Σσ², ``error`` = ‖ΔW − ΔW_r‖ / ‖ΔW‖."""

    module: str
    rank_in: int
    rank_out: int
    energy: float
    error: float
