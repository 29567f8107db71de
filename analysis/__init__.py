"""analysis: what a trained run learned. Embeddings to Zarr from any number of ranks (``analysis.embed``), exact
streamed PCA (``analysis.pca``), clusters, t-SNE, k-NN and cross-modal retrieval, attention maps, evolution over
checkpoints, and an HTML report; ``analysis all RUN`` runs what is missing (``analysis.pipeline``).
"""
