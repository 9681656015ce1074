"""The library side of the benchmark scripts (tools/bench_*.py are thin wrappers over it)."""
