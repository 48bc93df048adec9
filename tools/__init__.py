"""fxquant tools: benchmarks and reports (run as python -m fxquant.tools.NAME)."""
