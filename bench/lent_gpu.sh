#!/usr/bin/env bash
# One prepared session on a lent GPU machine (../shared/notes/gpu-feed.md: its python3 is 3.12 with torch, and no
# network). The wheels it lacks come from ../shared/tools/gpu-wheels.sh (.whl/1, .whl/2) plus .whl/3 (mpi4py,
# mpich, simplejpeg for cp312); a call carries at most 64 MiB, so the session takes two calls on the same warm
# machine, both from the repository root:
#
#   bench/lent_gpu.sh install    # carrying .whl/1 and .whl/3
#   bench/lent_gpu.sh run SHA    # carrying .whl/2; SHA = the commit measured (the machine sees the working tree)
#
# `run` measures `analysis embed` against the model-only rate (bench/train_gpu.py --only-embed), then ingest on
# the machine's cores (bench/ingest.py, 16 workers and mpiexec -n 2 x 8), and leaves bench/RESULTS.md, the
# summaries and the log in $OUT.
set -uo pipefail
site=/tmp/site
mpich=/tmp/mpich
pip_install() { python3 -m pip install -q --no-index --no-deps --no-compile "$@"; }

case "${1:-}" in
install)
    pip_install --target "$site" .whl/1/*.whl .whl/3/mpi4py*.whl .whl/3/simplejpeg*.whl
    pip_install --prefix "$mpich" .whl/3/mpich*.whl
    ls "$site" | wc -l
    ;;
run)
    pip_install --target "$site" .whl/2/*.whl
    export PYTHONPATH="$site:$PWD" PATH="$mpich/bin:$PATH" LD_LIBRARY_PATH="$mpich/lib"
    # Without this, the machine's own mpi4py build loads Debian's Open MPI under MPICH's mpiexec and every
    # process is rank 0 of 1.
    export MPI4PY_LIBMPI="$mpich/lib/libmpi.so.12"
    export SAGEPAIRS_COMMIT="${2:-unknown}"
    out="${OUT:-/tmp/out}"
    mkdir -p "$out"
    nvidia-smi --query-gpu=name,memory.total --format=csv,noheader > "$out/gpu.txt"
    # Straight to files, never through a pipe: a killed bench's orphaned workers would hold a pipe open, and the
    # call would wait out its whole limit. timeout kills its process group (the bench and its workers) on overrun.
    timeout -k 10 300 python3 bench/train_gpu.py --only-embed --embed-frames 8192 --embed-scale 0.1 \
        --steps 30 --embed-ranks 2 --summary "$out/train_gpu.md" > "$out/train_gpu.log" 2>&1
    cp bench/RESULTS.md "$out/RESULTS.md"
    timeout -k 10 150 python3 bench/ingest.py --frames 640 --workers 16 --mpi 2x8 --repeats 2 --sample 24 \
        > "$out/ingest.log" 2>&1
    cp bench/RESULTS.md "$out/RESULTS.md"
    grep -h "^- " "$out/train_gpu.log" "$out/ingest.log" | cut -c1-400
    ;;
*)
    echo "usage: bench/lent_gpu.sh install | run SHA" >&2
    exit 2
    ;;
esac
