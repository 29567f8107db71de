#!/usr/bin/env bash
# Cross-modal DINO against the demo's VICReg run at the same budget (issue 19): run after `make demo`, from the
# repository root. Trains tiny DINO models on demo/dataset (2 ranks, 20 epochs, batch 16 a rank, 4 local crops, a
# 4,096-way head), embeds and analyses them, and writes `analysis compare demo/run demo/dino` to demo/compare.
# A CPU-sized recipe: what it measures is that the pipeline runs DINO end to end, not DINO's best accuracy.
set -euo pipefail
export PATH=$PWD/.venv/bin:$PATH
rm -rf demo/dino
mpiexec -n 2 training run --config demo/train.toml --quiet --set data.dataset=demo/dataset --set run.dir=demo/dino \
  --set data.ir_size=[48,64] --set data.workers=1 --set model.rgb_arch=vit_tiny_patch16_224 \
  --set model.ir_arch=vit_tiny_patch16_224 --set model.depth=2 --set train.batch_size=16 --set train.epochs=20 \
  --set optim.base_lr=0.002 --set optim.warmup_epochs=2 --set train.checkpoint_every=5 --set train.log_every=2 \
  --set train.precision=fp32 --set model.objective=dino --set dino.out_dim=4096 --set dino.hidden_dim=512 \
  --set dino.local_crops_number=4
mpiexec -n 2 analysis embed demo/dino --config demo/analysis.toml
analysis all demo/dino --config demo/analysis.toml
analysis compare demo/run demo/dino --out demo/compare
