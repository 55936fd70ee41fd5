"""flatmin.integrations."""
