"""flatmin.experiments."""
