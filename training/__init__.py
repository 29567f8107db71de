"""training: VICReg training of an RGB ViT and an IR ViT over MPI ranks (planned: `training run --config train.toml`, `training jobscript`).

Not built yet: its issue comes after the data path (ingest, shards, catalog). The package and its command
exist so the layout and the console scripts are fixed from the start.
"""
