"""Benchmarks that print numbers (`ssps-jax bench-ssps`); timings are never asserted in tests."""
