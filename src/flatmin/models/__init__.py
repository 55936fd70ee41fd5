"""flatmin.models."""
