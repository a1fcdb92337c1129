"""Prints the kernel benchmarks' GB/s table at the end of the session (see harness.py)."""
from bench.kernels.harness import ROWS, copy_bandwidth_gb_s, summary_table


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    if not ROWS:
        return
    terminalreporter.section("kernel bandwidth (event-timed medians, L2 flushed)")
    terminalreporter.write_line(f"measured copy bandwidth (read + write): {copy_bandwidth_gb_s():.0f} GB/s")
    terminalreporter.write_line(summary_table(ROWS))
