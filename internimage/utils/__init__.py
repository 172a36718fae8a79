"""Small helpers shared by the tools (benchmarks)."""
