"""Latency histograms (:mod:`lab.measure.histogram`): encoded, decoded and added, they merge
exactly — the merged histogram is the one a single loader would have recorded."""

from __future__ import annotations

import pytest
from hdrh.histogram import HdrHistogram  # type: ignore[import-untyped]
from hypothesis import given
from hypothesis import strategies as st

from lab.measure.histogram import HIGHEST_US, LatencyHistogram

PERCENTS = [0.0, 1.0, 10.0, 25.0, 50.0, 75.0, 90.0, 99.0, 99.9, 99.99, 100.0]

latencies = st.one_of(
    st.integers(min_value=0, max_value=2_000),  # sub-millisecond: exact buckets
    st.integers(min_value=0, max_value=HIGHEST_US),  # anything up to an hour
)


def histogram_of(values: list[int]) -> LatencyHistogram:
    hist = LatencyHistogram()
    for value in values:
        hist.record(value)
    return hist


@given(
    values=st.lists(latencies, max_size=400),
    k=st.integers(min_value=1, max_value=6),
    data=st.data(),
)
def test_histograms_split_across_loaders_merge_into_the_histogram_of_all_values(
    values: list[int], k: int, data: st.DataObject
) -> None:
    loader_of = data.draw(
        st.lists(st.integers(0, k - 1), min_size=len(values), max_size=len(values))
    )
    parts = [LatencyHistogram() for _ in range(k)]
    for value, loader in zip(values, loader_of, strict=True):
        parts[loader].record(value)

    encoded = [part.encode() for part in parts]  # what each loader ships
    merged = LatencyHistogram.merged(LatencyHistogram.decode(text) for text in encoded)
    whole = histogram_of(values)

    assert merged.count == whole.count == len(values)
    assert merged.min == whole.min
    assert merged.max == whole.max
    for percent in PERCENTS:
        assert merged.percentile(percent) == whole.percentile(percent), percent
    assert merged == whole


def test_the_encoding_is_hdrhistograms_standard_one_readable_by_hdrh_itself() -> None:
    hist = histogram_of([120, 450, 450, 9_000])
    encoded = hist.encode()
    assert encoded.startswith("HISTF")  # base64 of the V2 compressed cookie
    theirs = HdrHistogram.decode(encoded)
    assert theirs.get_total_count() == 4
    assert theirs.get_value_at_percentile(50) == hist.percentile(50)


def test_adding_an_empty_histogram_keeps_the_minimum() -> None:
    # hdrh's own add() takes an empty histogram's minimum as 0; ours must not.
    hist = LatencyHistogram.merged([LatencyHistogram(), histogram_of([700, 900])])
    hist.add(LatencyHistogram.decode(LatencyHistogram().encode()))
    assert hist.min == 700
    assert hist.count == 2


def test_an_empty_histogram_reads_as_zeros() -> None:
    empty = LatencyHistogram.decode(LatencyHistogram().encode())
    assert (empty.count, empty.min, empty.max, empty.percentile(99), empty.mean) == (0, 0, 0, 0, 0)


def test_values_beyond_the_ceiling_are_kept_at_the_ceiling_not_dropped() -> None:
    hist = histogram_of([5, HIGHEST_US * 10, -3])
    assert hist.count == 3
    assert hist.max >= HIGHEST_US
    assert hist.min == 0


@pytest.mark.parametrize("text", ["", "not base64 at all", "HISTFAAAAAA="])
def test_decoding_something_else_is_a_value_error(text: str) -> None:
    with pytest.raises(ValueError):
        LatencyHistogram.decode(text)


def test_a_histogram_of_another_layout_is_refused_rather_than_merged_approximately() -> None:
    other = HdrHistogram(1, 60_000_000, 2)
    other.record_value(1234)
    encoded = other.encode()
    with pytest.raises(ValueError, match="layout"):
        LatencyHistogram.decode(encoded.decode() if isinstance(encoded, bytes) else encoded)


@given(st.lists(st.integers(min_value=0, max_value=10_000_000), min_size=1, max_size=300))
def test_mean_is_hdrh_own_mean_computed_faster(values: list[int]) -> None:
    """The mean walks the counts array, not hdrh's iterator: the same figure as hdrh's own
    get_mean_value(), and close to the plain arithmetic mean (a bucket is 0.1% wide)."""
    hist = LatencyHistogram()
    for value in values:
        hist.record(value)
    assert hist.mean == float(hist._hist.get_mean_value())
    plain = sum(values) / len(values)
    assert abs(hist.mean - plain) <= 0.001 * max(values) + 1
