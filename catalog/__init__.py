"""catalog: the Parquet catalog of a sagepairs dataset, queried with DuckDB.

``catalog.open(DATASET).query(sql) -> pyarrow.Table`` and ``catalog.open(DATASET).select(where) -> Selection``.
"""

from catalog.query import Catalog, CatalogError, open_catalog, write_selection

open = open_catalog  # noqa: A001 - the public spelling the design uses: catalog.open(DATASET)

__all__ = ["open", "Catalog", "CatalogError", "write_selection"]
