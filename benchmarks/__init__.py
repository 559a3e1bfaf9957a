"""Speed and memory measurements, written to BENCHMARKS.md (`python -m benchmarks.NAME`)."""
