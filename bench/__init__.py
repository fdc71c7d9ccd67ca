"""Benchmarks that print JSON figures; `medfed bench ...` runs them."""
