"""What experiments and analyses share: the results store (SQLite), the statistics of paired runs,
and the writers of tables (CSV, JSON) and figures. Below both, above the trainer."""
