"""Deprecated location of the results store: it moved to `flatmin.store` (below experiments and
analysis, which both read it)."""

import warnings

from flatmin.store import LEASE_S, SCHEMA, Store, owner_id

warnings.warn("flatmin.experiments.store moved to flatmin.store", DeprecationWarning, stacklevel=2)

__all__ = ["LEASE_S", "SCHEMA", "Store", "owner_id"]
