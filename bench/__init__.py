"""Benchmark of the sidecar against ceilings measured in the same run."""
