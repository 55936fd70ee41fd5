"""Experiments over many runs: `compare` (the main job), `grid`, the SQLite results `store`, `tuning`
on the validation split, and `report` tables/figures; see docs/experiments.md."""
