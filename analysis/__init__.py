"""analysis: embeddings to Zarr and out-of-core PCA, clustering, t-SNE, k-NN and an HTML report (planned: `analysis embed RUN`, `analysis report RUN`).

Not built yet: its issue comes after the data path (ingest, shards, catalog). The package and its command
exist so the layout and the console scripts are fixed from the start.
"""
