"""Benchmarks behind `pbs-engine bench`: each prints a table with ratios against peers measured in the same run."""
