"""Throughput and scaling benchmarks (see README.md here)."""
