"""flatmin.data."""
