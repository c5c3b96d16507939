"""Kept for the benchmark scripts' imports: the measure lives in attnlab.memory."""

from attnlab.memory import PeakMemory, peak_bytes  # noqa: F401

__all__ = ["PeakMemory", "peak_bytes"]
