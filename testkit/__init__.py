"""Instruments for tests and benchmarks, never installed with azregfs: the fault proxy."""
