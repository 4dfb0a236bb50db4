"""Latency histograms that merge exactly: a small typed wrapper around HdrHistogram.

Percentiles cannot be averaged — the p99 of two loaders is not the mean of their p99s — but
histograms can be *added*: every loader records into its own HdrHistogram, ships it as
HdrHistogram's standard base64 compressed encoding (``"HISTF…"``, readable by every HdrHistogram
implementation), and whoever merges decodes and adds the counts. The merged histogram is the
one a single loader would have recorded had it seen every value.

Every histogram here has the same fixed layout (values in microseconds, 1 µs to one hour, three
significant figures), so adding is a plain element-wise sum of counts. A value above the
ceiling is recorded as the ceiling (never dropped: a lost outlier is worse than a clipped one).

This module is the only one that touches the untyped ``hdrh`` package.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from hdrh.histogram import HdrHistogram  # type: ignore[import-untyped]

__all__ = ["HIGHEST_US", "LOWEST_US", "SIGNIFICANT_FIGURES", "LatencyHistogram"]

LOWEST_US = 1
HIGHEST_US = 3_600_000_000  # one hour
SIGNIFICANT_FIGURES = 3


class LatencyHistogram:
    """Counts of latencies in whole microseconds, with exact merging."""

    __slots__ = ("_hist",)

    def __init__(self, _hist: Any = None) -> None:
        self._hist: Any = (
            _hist if _hist is not None else HdrHistogram(LOWEST_US, HIGHEST_US, SIGNIFICANT_FIGURES)
        )

    # --- recording ---------------------------------------------------------------------------

    def record(self, value_us: int, count: int = 1) -> None:
        """Record ``value_us`` (clamped to 0 … :data:`HIGHEST_US`) ``count`` times."""
        value = min(max(int(value_us), 0), HIGHEST_US)
        if not self._hist.record_value(value, count):  # pragma: no cover - clamped above
            raise ValueError(f"cannot record {value_us} µs")

    def add(self, other: LatencyHistogram) -> None:
        """Add ``other``'s counts to this histogram (in place)."""
        # hdrh's add() takes min(self.min, other.min) with an empty histogram's min being 0:
        # adding an empty histogram would wrongly make the minimum 0. Nothing to add anyway.
        if other.count:
            self._hist.add(other._hist)

    @classmethod
    def merged(cls, parts: Iterable[LatencyHistogram]) -> LatencyHistogram:
        """A new histogram holding the sum of ``parts``."""
        total = cls()
        for part in parts:
            total.add(part)
        return total

    # --- the standard encoding -----------------------------------------------------------------

    def encode(self) -> str:
        """HdrHistogram's base64 compressed encoding (V2 ``HISTF…``), as text."""
        encoded = self._hist.encode()
        return encoded.decode("ascii") if isinstance(encoded, bytes) else str(encoded)

    @classmethod
    def decode(cls, encoded: str) -> LatencyHistogram:
        """The histogram ``encoded`` holds; :class:`ValueError` if it is not one of ours."""
        try:
            hist = HdrHistogram.decode(encoded.encode("ascii"))
        except Exception as exc:  # hdrh raises assorted types (TypeError, zlib.error, its own)
            raise ValueError(f"not an encoded HdrHistogram: {exc}") from exc
        if (
            hist.lowest_trackable_value != LOWEST_US
            or hist.highest_trackable_value != HIGHEST_US
            or hist.significant_figures != SIGNIFICANT_FIGURES
        ):
            # A different layout would still add, but only approximately (re-bucketing).
            raise ValueError(
                "histogram layout differs (lowest "
                f"{hist.lowest_trackable_value}, highest {hist.highest_trackable_value}, "
                f"{hist.significant_figures} significant figures): cannot merge exactly"
            )
        return cls(hist)

    # --- reading -------------------------------------------------------------------------------

    @property
    def count(self) -> int:
        return int(self._hist.get_total_count())

    @property
    def min(self) -> int:
        """The smallest recorded value (its bucket's lowest equivalent); 0 when empty."""
        return int(self._hist.get_min_value()) if self.count else 0

    @property
    def max(self) -> int:
        """The largest recorded value (its bucket's highest equivalent); 0 when empty."""
        return int(self._hist.get_max_value()) if self.count else 0

    @property
    def mean(self) -> float:
        """hdrh's mean (each bucket at its median equivalent value), computed over the counts
        array directly: hdrh's own walks its recorded-values iterator, a few Python calls per
        bucket up to the highest, ~0.1 s per histogram — per cell, in every report."""
        hist = self._hist
        total = hist.get_total_count()
        if not total:
            return 0.0
        counts, value_at, median = (
            hist.counts,
            hist.get_value_from_index,
            hist._hdr_median_equiv_value,
        )
        weighted = 0
        for index in range(hist.counts_len):
            count = counts[index]
            if count:
                weighted += count * median(value_at(index))
        return float(weighted) / float(total)

    def percentile(self, percent: float) -> int:
        """The value at ``percent`` (0–100): that share of values are ≤ it; 0 when empty."""
        if not 0 <= percent <= 100:
            raise ValueError(f"percentile must be 0–100, got {percent}")
        return int(self._hist.get_value_at_percentile(percent)) if self.count else 0

    def counts(self) -> list[tuple[int, int]]:
        """Every non-empty bucket as ``(value, count)``, in increasing value order."""
        return [
            (int(item.value_iterated_to), int(item.count_at_value_iterated_to))
            for item in self._hist.get_recorded_iterator()
        ]

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, LatencyHistogram):
            return NotImplemented
        return (
            self.count == other.count
            and self.min == other.min
            and self.max == other.max
            and self.counts() == other.counts()
        )

    __hash__ = None  # type: ignore[assignment]  # mutable

    def __repr__(self) -> str:
        return f"LatencyHistogram(count={self.count}, min={self.min}, max={self.max})"
