"""bench.kernels.streamk_phases' trace summary (the HYBRID_STREAMK_TRACE build's stamps) on
synthetic stamps: columns in us after CTA 0's start, and the medians it reports."""
import pytest

from bench.kernels.streamk_phases import trace_summary


def _raw(units, issued, ready, mma_issued, mma_done, t0=1_000_000):
    raw = [0] * 257
    for c, f in enumerate((issued, ready, mma_issued, mma_done)):
        for i in range(units):
            raw[64 * c + i] = t0 + int(round(f(i) * 1e3))
    raw[256] = t0
    return raw


def test_columns_and_medians():
    units = 23
    raw = _raw(units, issued=lambda i: 0.1 if i < 12 else 3.0 + 0.4 * (i - 12),
               ready=lambda i: 3.5 + 0.4 * i, mma_issued=lambda i: 3.6 + 0.4 * i, mma_done=lambda i: 3.7 + 0.4 * i)
    cols, gaps = trace_summary(raw, units)
    assert len(cols) == 4 and all(len(c) == units for c in cols)
    assert cols[1][0] == pytest.approx(3.5) and cols[3][22] == pytest.approx(3.7 + 0.4 * 22)
    assert gaps["ready_to_done"] == pytest.approx(0.2)
    assert gaps["ready_spacing"] == pytest.approx(0.4)
    # steady units only (12..22): ready 3.5 + 0.4 i - (3.0 + 0.4 (i - 12)) = 5.3, not the prologue's
    assert gaps["issue_to_ready"] == pytest.approx(5.3)


def test_units_beyond_the_cta_are_ignored():
    raw = _raw(64, issued=lambda i: 0.0, ready=lambda i: 1.0 + i, mma_issued=lambda i: 1.0 + i,
               mma_done=lambda i: 1.5 + i)
    raw[64 + 5] = -10**15  # garbage past the CTA's 5 units
    cols, gaps = trace_summary(raw, 5)
    assert cols[1] == pytest.approx([1.0, 2.0, 3.0, 4.0, 5.0])
    assert gaps["ready_spacing"] == pytest.approx(1.0)
