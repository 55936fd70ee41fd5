"""flatmin.train."""
