"""training: VICReg of an RGB ViT and an IR ViT, streamed from a sagepairs dataset across MPI ranks.

``training run --config train.toml`` (alone or under ``mpiexec -n R``), ``training init-config``,
``training jobscript``. The library: ``training.config`` (typed config), ``training.loader`` (step plan and
batches), ``training.transforms`` (pure augmentations), ``training.model`` (ViTs, expanders, VICReg loss),
``training.train`` (the run).
"""
