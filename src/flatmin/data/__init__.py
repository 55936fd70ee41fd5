"""Datasets as whole in-memory tensors behind one registry: `load_dataset(name, ...)`."""

from flatmin.data import user  # noqa: F401 (registers npz:, folder:, csv: with the registry)
from flatmin.data.registry import DATASETS, Dataset, Split, load_dataset

__all__ = ["DATASETS", "Dataset", "Split", "load_dataset"]
