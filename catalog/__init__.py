"""catalog: the Parquet catalog of a sagepairs dataset, queried with DuckDB.

``catalog.open(DATASET).query(sql) -> pyarrow.Table`` and ``catalog.open(DATASET).select(where) -> Selection``;
DATASET is a directory or the URL of a published dataset (``s3://bucket/prefix``, ``https://host/prefix``).
"""

from catalog.query import Catalog, CatalogError, open_catalog, write_selection
from catalog.storage import StorageError, dataset_exists, dataset_ref, is_remote

open = open_catalog  # noqa: A001 - the public spelling the design uses: catalog.open(DATASET)

__all__ = ["open", "Catalog", "CatalogError", "write_selection", "StorageError", "dataset_exists", "dataset_ref",
           "is_remote"]
