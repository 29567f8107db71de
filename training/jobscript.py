"""`training jobscript`: a PBS or Slurm batch script that runs `training run` over MPI and resumes after wall time.

The script is text for the user to read, save and submit (``qsub`` / ``sbatch``), so every value that came
from the user is either validated (scheduler directives, which the shell never sees) or shell-quoted.

What the script relies on from ``training run`` (docs/jobscripts.md says the same for users):

- exit 0: the schedule is done; any other status: it is not.
- SIGTERM: save ``RUN/checkpoints/last.pt`` and exit 143 (SIGINT: 130). Running the same command again resumes.

The script stops the ranks itself shortly before the wall time (``STOP_MARGIN_S``), so that they checkpoint
before the scheduler's own SIGTERM/SIGKILL, and then resubmits (PBS: ``qsub`` of the script file) or requeues
(Slurm: ``scontrol requeue``) itself, at most ``SAGEPAIRS_MAX_RESUBMIT`` times (default 10).
"""

from __future__ import annotations

import json
import os
import re
import shlex
import sys
from dataclasses import dataclass

__all__ = [
    "JobSpec",
    "render_jobscript",
    "walltime_seconds",
    "stop_margin_s",
    "SCHEDULERS",
    "DEFAULT_CPUS_PER_RANK",
    "MAX_RESUBMIT",
]

SCHEDULERS = ("pbs", "slurm")
# ALCF Polaris has 32 cores for its 4 A100s: 8 per rank, for the rank and its DataLoader workers.
DEFAULT_CPUS_PER_RANK = 8
MAX_RESUBMIT = 10
# Long enough for the ranks to finish a step and write last.pt, short enough to waste little of the allocation.
STOP_MARGIN_MAX_S = 120

_WALLTIME = re.compile(r"^(\d+):([0-5]\d):([0-5]\d)$")
# Directive values reach the scheduler, not the shell: anything that could end or extend a directive line is refused.
_DIRECTIVE_VALUE = re.compile(r"^[A-Za-z0-9_.:,+@=/-]+$")
_JOB_NAME = re.compile(r"^[A-Za-z][A-Za-z0-9_.-]{0,63}$")


@dataclass(frozen=True)
class JobSpec:
    config: str  # path to the train.toml (made absolute in the script)
    scheduler: str  # "pbs" | "slurm"
    nodes: int
    ranks_per_node: int  # usually GPUs per node
    walltime: str = "01:00:00"
    account: str | None = None
    queue: str | None = None  # PBS queue / Slurm partition
    filesystems: str | None = None  # PBS only: -l filesystems=home:eagle (ALCF Polaris needs it)
    job_name: str = "sagepairs"
    venv: str | None = None  # virtual environment activated in the job (default: the one running this code)
    run_dir: str | None = None  # the config's run.dir (required): the script checks RUN/checkpoints/last.pt
    sets: tuple[str, ...] = ()  # extra `--set section.key=value` items forwarded to `training run`
    cpus_per_rank: int | None = None  # CPU binding depth and OMP_NUM_THREADS (default DEFAULT_CPUS_PER_RANK)
    # PBS only: where the script will be saved. PBS hands a job script to bash on stdin, so the script cannot
    # find its own file to resubmit; without this the user sets SAGEPAIRS_JOBSCRIPT at qsub time instead.
    script_path: str | None = None


@dataclass(frozen=True)
class _Resolved:
    """A validated JobSpec with absolute paths and defaults filled in."""

    spec: JobSpec
    config: str
    run_dir: str
    venv: str
    script_path: str | None
    walltime_s: int
    cpus_per_rank: int

    @property
    def ranks(self) -> int:
        return self.spec.nodes * self.spec.ranks_per_node


# -- validation ---------------------------------------------------------------------------------------------

def walltime_seconds(walltime: str) -> int:
    """``HH:MM:SS`` (hours may exceed 24) to seconds; ValueError names the bad value."""
    match = _WALLTIME.match(walltime)
    if match is None:
        raise ValueError(f"walltime {walltime!r}: expected HH:MM:SS, e.g. 01:00:00")
    hours, minutes, seconds = (int(g) for g in match.groups())
    total = hours * 3600 + minutes * 60 + seconds
    if total <= 0:
        raise ValueError(f"walltime {walltime!r}: must be longer than zero")
    return total


def stop_margin_s(walltime_s: int) -> int:
    """Seconds before the wall time at which the ranks are told to checkpoint and stop."""
    return max(1, min(STOP_MARGIN_MAX_S, walltime_s // 10))


def _check_directive_value(name: str, value: str | None) -> None:
    if value is not None and not _DIRECTIVE_VALUE.match(value):
        raise ValueError(
            f"{name} {value!r}: only letters, digits and _.:,+@=/- are allowed (it goes into a scheduler directive)"
        )


def _check_counts(spec: JobSpec) -> None:
    if spec.scheduler not in SCHEDULERS:
        hint = " (Cobalt is retired; ALCF Polaris uses PBS)" if spec.scheduler == "cobalt" else ""
        raise ValueError(f"scheduler {spec.scheduler!r}: expected one of {', '.join(SCHEDULERS)}{hint}")
    _check_positive("nodes", spec.nodes)
    _check_positive("ranks_per_node", spec.ranks_per_node)
    if spec.cpus_per_rank is not None:
        _check_positive("cpus_per_rank", spec.cpus_per_rank)


def _check_positive(name: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be an integer >= 1, got {value!r}")


def _check_directives(spec: JobSpec) -> None:
    if spec.filesystems is not None and spec.scheduler != "pbs":
        raise ValueError(
            f"filesystems {spec.filesystems!r} is a PBS resource (-l filesystems=...); drop it for --scheduler {spec.scheduler}"
        )
    if not _JOB_NAME.match(spec.job_name):
        raise ValueError(
            f"job_name {spec.job_name!r}: must start with a letter and hold at most 64 letters, digits and _.-"
        )
    _check_directive_value("account", spec.account)
    _check_directive_value("queue", spec.queue)
    _check_directive_value("filesystems", spec.filesystems)


def _check_sets(sets: tuple[str, ...]) -> None:
    for item in sets:
        name, sep, _ = item.partition("=")
        parts = name.strip().split(".")
        if not sep or len(parts) < 2 or not all(parts):
            raise ValueError(f"--set {item!r}: expected section.key=value")


def _resolve_paths(spec: JobSpec) -> tuple[str, str, str, str | None]:
    config = os.path.abspath(spec.config)
    if not os.path.isfile(config):
        raise ValueError(f"config {spec.config!r}: no such file")
    if not spec.run_dir:
        raise ValueError("run_dir is required (the config's run.dir): the script resumes from RUN/checkpoints/last.pt")
    venv = os.path.abspath(spec.venv if spec.venv is not None else sys.prefix)
    if not os.path.isfile(os.path.join(venv, "bin", "activate")):
        raise ValueError(f"venv {venv!r}: no bin/activate there; pass the virtual environment the job should use")
    script_path = None
    if spec.script_path is not None:
        script_path = os.path.abspath(spec.script_path)
        if "," in script_path:  # qsub -v splits its list at commas
            raise ValueError(f"script_path {script_path!r}: must not contain a comma (qsub -v cannot pass it)")
    return config, os.path.abspath(spec.run_dir), venv, script_path


def _resolve(spec: JobSpec) -> _Resolved:
    _check_counts(spec)
    _check_directives(spec)
    _check_sets(spec.sets)
    walltime_s = walltime_seconds(spec.walltime)
    config, run_dir, venv, script_path = _resolve_paths(spec)
    cpus = spec.cpus_per_rank if spec.cpus_per_rank is not None else DEFAULT_CPUS_PER_RANK
    return _Resolved(spec, config, run_dir, venv, script_path, walltime_s, cpus)


# -- pieces of the script -----------------------------------------------------------------------------------

def _pbs_directives(r: _Resolved) -> list[str]:
    s = r.spec
    lines = [
        f"#PBS -N {s.job_name}",
        f"#PBS -l select={s.nodes}:ncpus={s.ranks_per_node * r.cpus_per_rank}:ngpus={s.ranks_per_node}",
        "#PBS -l place=scatter",
        f"#PBS -l walltime={s.walltime}",
    ]
    if s.filesystems:
        lines.append(f"#PBS -l filesystems={s.filesystems}")
    if s.account:
        lines.append(f"#PBS -A {s.account}")
    if s.queue:
        lines.append(f"#PBS -q {s.queue}")
    lines.append("#PBS -j oe")
    log_dir = r.run_dir + "/job-logs/"
    # A directory: PBS copies its spool file <jobid>.OU into it at the end. A path the directive cannot carry
    # (spaces, quotes) leaves PBS's default, <name>.o<jobid> in the submit directory.
    if _DIRECTIVE_VALUE.match(log_dir):
        lines.append(f"#PBS -o {log_dir}")
    return lines


def _slurm_directives(r: _Resolved) -> list[str]:
    s = r.spec
    lines = [
        f"#SBATCH --job-name={s.job_name}",
        f"#SBATCH --nodes={s.nodes}",
        f"#SBATCH --ntasks-per-node={s.ranks_per_node}",
        f"#SBATCH --gpus-per-node={s.ranks_per_node}",
        f"#SBATCH --cpus-per-task={r.cpus_per_rank}",
        f"#SBATCH --time={s.walltime}",
    ]
    if s.account:
        lines.append(f"#SBATCH --account={s.account}")
    if s.queue:
        lines.append(f"#SBATCH --partition={s.queue}")
    lines += [
        # In the submit directory: Slurm opens the log before the script runs, when RUN/job-logs may not exist yet.
        "#SBATCH --output=%x-%j.out",
        "#SBATCH --open-mode=append",
        "#SBATCH --requeue",
        f"#SBATCH --signal=B:USR1@{stop_margin_s(r.walltime_s)}",
    ]
    return lines


_PBS_NOTES = """\
#
# sagepairs training job for PBS Professional, rendered by `training jobscript`. Submit: {submit}
#
# ALCF Polaris (4 A100 and 32 cores per node: --ranks-per-node 4): ALCF's examples write
# `#PBS -l select=N:system=polaris`; use that if the queue refuses the generic select above. Polaris also needs
# `-l filesystems=` naming every file system the job touches (home, eagle, grand), an allocation (-A) and a queue (-q).
# `training run` takes its rank, world size and local rank (which selects the GPU) from mpi4py.
#
# Wall time: STOP_MARGIN_S before it, the ranks get SIGTERM, write RUN/checkpoints/last.pt and exit 143;
# the job then resubmits this file (JOBSCRIPT below), and the new job resumes from last.pt. PBS feeds the
# script to bash on stdin, so the job cannot find its own file: {where}.
# Options given on the qsub command line are not repeated on resubmission: keep them in the #PBS lines above.
# Environment knobs (qsub -v NAME=VALUE): SAGEPAIRS_MAX_RESUBMIT (default 10; 0: never), SAGEPAIRS_STOP_MARGIN
# (seconds; default below), SAGEPAIRS_JOBSCRIPT. qdel stops the chain: a job told to stop never resubmits.
"""

_SLURM_NOTES = """\
#
# sagepairs training job for Slurm, rendered by `training jobscript`. Submit: sbatch THIS_FILE
#
# `training run` takes its rank, world size and local rank (which selects the GPU) from mpi4py; srun starts
# the ranks through PMI, so mpi4py must use an MPI that speaks the site's PMI (add e.g. --mpi=pmix to srun
# if the site's default does not fit).
#
# Wall time: --signal=B:USR1@N warns this script N seconds before the limit; it then sends SIGTERM to the
# ranks, which write RUN/checkpoints/last.pt and exit 143, and requeues the job (scontrol requeue: same job
# id, same script, the log appended), which resumes from last.pt. Slurm runs a private copy of the script,
# so `sbatch "$0"` would not find this file; requeueing needs no file at all.
# Environment knobs (export before sbatch): SAGEPAIRS_MAX_RESUBMIT (default 10; 0: never).
# scancel stops the chain: a job told to stop never requeues.
"""


def _pbs_notes(script_path: str | None) -> str:
    if script_path is None:
        submit = "qsub -v SAGEPAIRS_JOBSCRIPT=$PWD/THIS_FILE THIS_FILE"
        where = "SAGEPAIRS_JOBSCRIPT names it"
    else:
        submit = f"qsub {shlex.quote(script_path)}"
        where = "it was rendered for that path; if you move it, qsub -v SAGEPAIRS_JOBSCRIPT=NEW_PATH NEW_PATH"
    return _PBS_NOTES.format(submit=submit, where=where)


def _parameters(r: _Resolved) -> list[str]:
    q = shlex.quote
    lines = [
        f"CONFIG={q(r.config)}",
        f"RUN={q(r.run_dir)}",
        f"VENV={q(r.venv)}",
        f"CPUS_PER_RANK={r.cpus_per_rank}",
        f'MAX_RESUBMIT="${{SAGEPAIRS_MAX_RESUBMIT:-{MAX_RESUBMIT}}}"',
    ]
    if r.spec.scheduler == "pbs":
        lines += [
            f"WALLTIME_S={r.walltime_s}  # keep in step with '#PBS -l walltime' above",
            f'STOP_MARGIN_S="${{SAGEPAIRS_STOP_MARGIN:-{stop_margin_s(r.walltime_s)}}}"',
            'JOBSCRIPT="${SAGEPAIRS_JOBSCRIPT:-}"' if r.script_path is None
            else f'JOBSCRIPT="${{SAGEPAIRS_JOBSCRIPT:-{_dq(r.script_path)}}}"',
        ]
    return lines


def _dq(text: str) -> str:
    """Escape for the inside of a bash double-quoted string (used in ${VAR:-default})."""
    return re.sub(r'(["\\$`])', r"\\\1", text)


def _train_args(r: _Resolved) -> list[str]:
    # run.dir is passed explicitly so that the ranks and this script agree on RUN whatever directory the job
    # starts in (a relative run.dir in the TOML would otherwise depend on it). JSON text is a TOML string.
    sets = [f"run.dir={json.dumps(r.run_dir)}", *r.spec.sets]
    args = ["training", "run", "--config", '"$CONFIG"']
    for item in sets:
        args += ["--set", shlex.quote(item)]
    return args


def _launch_line(r: _Resolved) -> str:
    s = r.spec
    if s.scheduler == "pbs":
        launcher = ['"$MPIEXEC"', "-n", str(r.ranks), "--ppn", str(s.ranks_per_node),
                    "--depth", str(r.cpus_per_rank), "--cpu-bind", "depth"]
    else:
        launcher = ["srun", f"--nodes={s.nodes}", f"--ntasks={r.ranks}", f"--ntasks-per-node={s.ranks_per_node}",
                    f"--cpus-per-task={r.cpus_per_rank}", "--cpu-bind=cores",
                    # A rank that dies ends the step at once (Slurm's default lets the others run on).
                    "--kill-on-bad-exit=1"]
    return " \\\n    ".join([" ".join(launcher), " ".join(_train_args(r))]) + " &"


_SETUP_PBS = """\
# Run by bash directly (or by Torque) $0 is this file; under PBS Pro it is only the shell's name.
if [[ -z $JOBSCRIPT && -f $0 ]]; then JOBSCRIPT=$(realpath -- "$0"); fi
cd "${PBS_O_WORKDIR:-$PWD}"
JOB_ID="${PBS_JOBID:-local}"
RESUBMITS_SO_FAR="${SAGEPAIRS_RESUBMIT:-0}"
"""

_SETUP_SLURM = """\
cd "${SLURM_SUBMIT_DIR:-$PWD}"
JOB_ID="${SLURM_JOB_ID:-local}"
RESUBMITS_SO_FAR="${SLURM_RESTART_COUNT:-0}"
"""

_SITE = """\
# ---- site setup: module loads and network settings go here (module use/load, NCCL_* and FI_* variables from
# the site's docs, e.g. ALCF's for Polaris). If the venv holds the `mpich` wheel, point mpi4py at the site MPI
# instead (see mpi4py's install notes), or the ranks may not talk to the site launcher and network.
"""

_LAUNCHER_PBS = """\
# Resolved before the venv is activated: the venv's `mpich` wheel brings its own mpiexec (Hydra), which
# would shadow the site launcher (Cray PALS on Polaris, whose options --ppn/--depth/--cpu-bind are used below).
MPIEXEC="${SAGEPAIRS_MPIEXEC:-$(command -v mpiexec || true)}"
if [[ -z $MPIEXEC ]]; then
    echo "sagepairs: no mpiexec on PATH; load the site's MPI module in the site setup block" >&2
    exit 2
fi
"""

_ENVIRONMENT = """\
set +u  # activate scripts are not written for nounset
# shellcheck disable=SC1091
source "$VENV/bin/activate"
set -u
export OMP_NUM_THREADS="$CPUS_PER_RANK"
mkdir -p "$RUN/job-logs"
"""

_SUPERVISE = """\
log() { printf '[sagepairs %s %s] %s\\n' "$(date '+%F %T')" "$JOB_ID" "$*"; }

# ---- stop in time, pass signals on ----------------------------------------------------------------------
TIME_UP=0       # USR1: the wall time is nearly spent
CANCELLED=0     # TERM/INT to this shell: qdel, scancel, preemption or a user; such a job never resubmits
SIGNALS=0
LAUNCHER_PID=
TIMER_PID=
stop_ranks() {
    if [[ -n $LAUNCHER_PID ]]; then kill -TERM "$LAUNCHER_PID" 2>/dev/null || true; fi
}
on_time_up() {
    SIGNALS=$((SIGNALS + 1)); TIME_UP=1
    log "wall time nearly spent: SIGTERM to the ranks (they save last.pt)"; stop_ranks
}
on_stop() {
    SIGNALS=$((SIGNALS + 1)); CANCELLED=1
    log "job told to stop: SIGTERM to the ranks"; stop_ranks
}
trap on_time_up USR1
trap on_stop TERM INT

# bash's wait returns early (status > 128) when a trapped signal arrives; wait again for the launcher's own status.
wait_launcher() {
    local seen rc
    STATUS=
    while :; do
        seen=$SIGNALS
        if wait "$LAUNCHER_PID"; then rc=0; else rc=$?; fi
        if [[ $rc == 127 && -n $STATUS ]]; then break; fi  # the previous wait already collected it
        STATUS=$rc
        if [[ $SIGNALS == "$seen" ]]; then break; fi
    done
}

# Resubmit only a run that was stopped for time: not one that finished, failed, or was cancelled.
should_resubmit() {
    local status=$1
    if [[ $status == 0 ]]; then
        log "training run finished (exit 0)"; return 1
    fi
    if [[ $TIME_UP != 1 ]] && [[ $CANCELLED == 1 || $status != 143 ]]; then
        log "training run exited $status, not stopped for wall time: not resubmitting (see the log above)"; return 1
    fi
    if [[ ! -f $RUN/checkpoints/last.pt ]]; then
        log "training run exited $status and there is no $RUN/checkpoints/last.pt to resume from: not resubmitting"
        return 1
    fi
    if (( RESUBMITS_SO_FAR >= MAX_RESUBMIT )); then
        log "resubmitted $RESUBMITS_SO_FAR times already (SAGEPAIRS_MAX_RESUBMIT=$MAX_RESUBMIT): not resubmitting"
        return 1
    fi
    return 0
}
"""

_TIMER_PBS = """\
# PBS gives no warning before its wall-time SIGTERM (and SIGKILL soon after), so a timer stands in for
# Slurm's --signal: it sends USR1 to this shell STOP_MARGIN_S before the wall time.
start_timer() {
    local after=$((WALLTIME_S - STOP_MARGIN_S)) shell_pid=$$
    if (( after <= 0 )); then return 0; fi
    (
        sleep_pid=
        trap '[[ -n $sleep_pid ]] && kill "$sleep_pid" 2>/dev/null; exit 0' TERM
        sleep "$after" & sleep_pid=$!
        wait "$sleep_pid" && kill -USR1 "$shell_pid"
    ) </dev/null >/dev/null 2>&1 &
    TIMER_PID=$!
}
start_timer
"""

_FINISH_PBS = """\
wait_launcher
if [[ -n $TIMER_PID ]]; then kill "$TIMER_PID" 2>/dev/null || true; fi
if ! should_resubmit "$STATUS"; then exit "$STATUS"; fi
if [[ -z $JOBSCRIPT || ! -f $JOBSCRIPT ]]; then
    log "cannot resubmit: this script's file is unknown (${JOBSCRIPT:-unset}); resume with: qsub -v SAGEPAIRS_JOBSCRIPT=/path/to/it /path/to/it"
    exit "$STATUS"
fi
NEXT=$((RESUBMITS_SO_FAR + 1))
VARS="SAGEPAIRS_RESUBMIT=$NEXT,SAGEPAIRS_MAX_RESUBMIT=$MAX_RESUBMIT,SAGEPAIRS_STOP_MARGIN=$STOP_MARGIN_S,SAGEPAIRS_JOBSCRIPT=$JOBSCRIPT"
# PBS may be reading this very script from stdin: keep qsub off it.
if NEW_JOB=$(qsub -v "$VARS" "$JOBSCRIPT" </dev/null); then
    log "stopped for wall time (exit $STATUS); resubmitted as $NEW_JOB (resubmission $NEXT of at most $MAX_RESUBMIT)"
    exit 0
fi
log "qsub failed; resume by hand: qsub -v SAGEPAIRS_JOBSCRIPT=$JOBSCRIPT $JOBSCRIPT"
exit "$STATUS"
"""

_FINISH_SLURM = """\
wait_launcher
if ! should_resubmit "$STATUS"; then exit "$STATUS"; fi
# Requeue keeps the job id, its script and its options; Slurm then ends this shell and counts the restart in
# SLURM_RESTART_COUNT, which bounds the chain.
log "stopped for wall time (exit $STATUS); requeueing (restart $((RESUBMITS_SO_FAR + 1)) of at most $MAX_RESUBMIT)"
if scontrol requeue "$JOB_ID" </dev/null; then exit 0; fi
log "scontrol requeue failed; resume by hand: sbatch this script again"
exit "$STATUS"
"""


def _header(r: _Resolved) -> list[str]:
    if r.spec.scheduler == "pbs":
        return ["#!/bin/bash", *_pbs_directives(r), _pbs_notes(r.script_path).rstrip("\n")]
    return ["#!/bin/bash", *_slurm_directives(r), _SLURM_NOTES.rstrip("\n")]


def render_jobscript(spec: JobSpec) -> str:
    """The batch script for ``spec``; ValueError (one line, naming the field) when the spec is not usable."""
    r = _resolve(spec)
    pbs = spec.scheduler == "pbs"
    parts = [
        "\n".join(_header(r)),
        "set -euo pipefail",
        "\n".join(_parameters(r)),
        _SETUP_PBS if pbs else _SETUP_SLURM,
        _SITE,
        _LAUNCHER_PBS if pbs else "",
        _ENVIRONMENT,
        _SUPERVISE,
        _TIMER_PBS if pbs else "",
        f'log "launch: {r.ranks} ranks on {spec.nodes} node(s); config $CONFIG; run $RUN"\n'
        + _launch_line(r) + "\nLAUNCHER_PID=$!\n",
        _FINISH_PBS if pbs else _FINISH_SLURM,
    ]
    return "\n".join(p.rstrip("\n") + "\n" for p in parts if p)
