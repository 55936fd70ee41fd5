"""flatmin.analysis."""
