"""`training.jobscript`: rendered PBS/Slurm scripts parse, launch the right ranks, and resubmit only after a wall-time stop.

The behavioural tests run the rendered script with bash, with fake `mpiexec`/`srun`/`qsub`/`scontrol` first
on PATH; no scheduler, MPI or torch is needed.
"""

from __future__ import annotations

import os
import re
import shlex
import signal
import subprocess
import time
from pathlib import Path

import pytest

from training.jobscript import JobSpec, render_jobscript, stop_margin_s, walltime_seconds

FAKE_LAUNCHER = """\
#!/bin/bash
# Records how it was called; exits FAKE_EXIT, or with FAKE_WAIT_TERM=1 waits for SIGTERM and exits 143 like `training run`.
if [[ ${FAKE_WAIT_TERM:-0} == 1 ]]; then
    trap 'echo TERM >> "$FAKE_LOG/launcher.signals"; kill "$s" 2>/dev/null; exit 143' TERM
fi
printf '%s\\n' "$@" > "$FAKE_LOG/launcher.args"
printf 'OMP_NUM_THREADS=%s VENV_ACTIVE=%s\\n' "$OMP_NUM_THREADS" "${FAKE_VENV_ACTIVE:-}" > "$FAKE_LOG/launcher.env"
if [[ ${FAKE_WAIT_TERM:-0} == 1 ]]; then
    sleep 20 & s=$!
    wait "$s"
    exit 0
fi
exit "${FAKE_EXIT:-0}"
"""

FAKE_SUBMIT = """\
#!/bin/bash
echo "$*" >> "$FAKE_LOG/{name}.calls"
echo 4242.fake
"""

# The fake venv puts a launcher of its own first on PATH, as the `mpich` wheel does; the job must not use it.
FAKE_ACTIVATE = """\
export FAKE_VENV_ACTIVE=1
export PATH="{venv}/bin:$PATH"
"""


@pytest.fixture()
def site(tmp_path: Path) -> Path:
    """A config, a venv with bin/activate, fake scheduler tools and a log directory, under a path with a space."""
    root = tmp_path / "my site"
    (root / "logs").mkdir(parents=True)
    (root / "train.toml").write_text('[run]\ndir = "runs/vicreg"\n')
    venv_bin = root / "venv" / "bin"
    venv_bin.mkdir(parents=True)
    (venv_bin / "activate").write_text(FAKE_ACTIVATE.format(venv=root / "venv"))
    _executable(venv_bin / "mpiexec", "#!/bin/bash\necho 'venv mpiexec used' >&2\nexit 99\n")
    fake_bin = root / "bin"
    fake_bin.mkdir()
    for launcher in ("mpiexec", "srun"):
        _executable(fake_bin / launcher, FAKE_LAUNCHER)
    for submit in ("qsub", "scontrol"):
        _executable(fake_bin / submit, FAKE_SUBMIT.format(name=submit))
    return root


def _executable(path: Path, text: str) -> None:
    path.write_text(text)
    path.chmod(0o755)


def _spec(site: Path, scheduler: str = "pbs", **kwargs) -> JobSpec:
    defaults = dict(
        config=str(site / "train.toml"), scheduler=scheduler, nodes=2, ranks_per_node=4,
        venv=str(site / "venv"), run_dir=str(site / "runs" / "vicreg"),
    )
    defaults.update(kwargs)
    return JobSpec(**defaults)


def _write(site: Path, text: str, name: str = "job.sh") -> Path:
    path = site / name
    path.write_text(text)
    return path


def _bash_n(path: Path) -> None:
    result = subprocess.run(["bash", "-n", str(path)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


# -- rendering ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("scheduler", ["pbs", "slurm"])
def test_rendered_script_passes_bash_syntax_check(site: Path, scheduler: str) -> None:
    extra = {"filesystems": "home:eagle"} if scheduler == "pbs" else {}
    text = render_jobscript(_spec(site, scheduler, account="MYPROJ", queue="prod", sets=("optim.base_lr=0.3",), **extra))
    assert text.startswith("#!/bin/bash\n")
    assert "set -euo pipefail" in text
    _bash_n(_write(site, text))


def test_pbs_directives_and_mpiexec_line(site: Path) -> None:
    text = render_jobscript(_spec(site, "pbs", walltime="02:30:00", account="MYPROJ", queue="prod",
                                  filesystems="home:eagle", job_name="vicreg1"))
    directives = [line for line in text.splitlines() if line.startswith("#PBS")]
    assert "#PBS -l select=2:ncpus=32:ngpus=4" in directives
    assert "#PBS -l walltime=02:30:00" in directives
    assert "#PBS -A MYPROJ" in directives
    assert "#PBS -q prod" in directives
    assert "#PBS -l filesystems=home:eagle" in directives
    assert "#PBS -N vicreg1" in directives
    assert "#PBS -j oe" in directives
    # Directives must come straight after the shebang: qsub may stop reading them at the first other line.
    assert text.splitlines()[1 : 1 + len(directives)] == directives
    assert re.search(r'"\$MPIEXEC" -n 8 --ppn 4 --depth 8 --cpu-bind depth \\\n\s+training run --config "\$CONFIG"', text)
    assert 'cd "${PBS_O_WORKDIR:-$PWD}"' in text
    assert "source \"$VENV/bin/activate\"" in text and f"VENV={shlex.quote(str(site / 'venv'))}" in text
    assert 'export OMP_NUM_THREADS="$CPUS_PER_RANK"' in text and "CPUS_PER_RANK=8" in text
    assert "qsub -v" in text and "SAGEPAIRS_RESUBMIT" in text and "checkpoints/last.pt" in text
    assert "WALLTIME_S=9000" in text and 'STOP_MARGIN_S="${SAGEPAIRS_STOP_MARGIN:-120}"' in text


def test_slurm_directives_and_srun_line(site: Path) -> None:
    text = render_jobscript(_spec(site, "slurm", nodes=3, ranks_per_node=2, cpus_per_rank=16,
                                  walltime="00:20:00", account="MYPROJ", queue="gpu"))
    directives = [line for line in text.splitlines() if line.startswith("#SBATCH")]
    for expected in ("--nodes=3", "--ntasks-per-node=2", "--gpus-per-node=2", "--cpus-per-task=16",
                     "--time=00:20:00", "--account=MYPROJ", "--partition=gpu", "--job-name=sagepairs",
                     "--requeue", "--open-mode=append", "--signal=B:USR1@120"):
        assert f"#SBATCH {expected}" in directives, expected
    assert any(d.startswith("#SBATCH --output=") for d in directives)
    assert re.search(r"srun --nodes=3 --ntasks=6 --ntasks-per-node=2 --cpus-per-task=16 --cpu-bind=cores "
                     r"--kill-on-bad-exit=1 \\\n"
                     r'\s+training run --config "\$CONFIG"', text)
    assert "mpi4py" in text  # says where rank and world size come from
    assert 'scontrol requeue "$JOB_ID"' in text and "SLURM_RESTART_COUNT" in text
    assert "qsub" not in text and "filesystems" not in text


def test_sets_and_run_dir_are_forwarded_quoted(site: Path) -> None:
    text = render_jobscript(_spec(site, sets=("data.where=split = 'val'", "train.epochs=3")))
    line = next(line for line in text.splitlines() if line.lstrip().startswith("training run"))
    args = shlex.split(line.replace('"$CONFIG"', "CONFIG").rstrip(" &"))
    run_dir = str(site / "runs" / "vicreg")
    assert args == ["training", "run", "--config", "CONFIG", "--set", f'run.dir="{run_dir}"',
                    "--set", "data.where=split = 'val'", "--set", "train.epochs=3"]


def test_config_and_run_dir_are_made_absolute(site: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(site)
    text = render_jobscript(_spec(site, config="train.toml", run_dir="runs/vicreg", venv="venv"))
    assert f"CONFIG={shlex.quote(str(site / 'train.toml'))}" in text
    assert f"RUN={shlex.quote(str(site / 'runs' / 'vicreg'))}" in text


def test_pbs_log_directory_when_the_path_allows_it(tmp_path: Path, site: Path) -> None:
    plain = tmp_path / "plain"
    text = render_jobscript(_spec(site, run_dir=str(plain)))
    assert f"#PBS -o {plain}/job-logs/" in text
    # A run dir with a space cannot go into a directive; PBS's default log location is kept instead.
    assert "#PBS -o" not in render_jobscript(_spec(site))


def test_stop_margin_scales_down_for_short_jobs() -> None:
    assert stop_margin_s(walltime_seconds("01:00:00")) == 120
    assert stop_margin_s(walltime_seconds("00:05:00")) == 30
    assert stop_margin_s(walltime_seconds("00:00:05")) == 1
    assert walltime_seconds("48:00:00") == 48 * 3600


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"walltime": "1:00"}, "walltime '1:00'"),
        ({"walltime": "01:60:00"}, "walltime '01:60:00'"),
        ({"walltime": "00:00:00"}, "walltime '00:00:00'"),
        ({"nodes": 0}, "nodes must be an integer >= 1"),
        ({"ranks_per_node": 0}, "ranks_per_node must be an integer >= 1"),
        ({"cpus_per_rank": 0}, "cpus_per_rank"),
        ({"scheduler": "slurm", "filesystems": "home:eagle"}, "filesystems 'home:eagle' is a PBS resource"),
        ({"scheduler": "cobalt"}, "scheduler 'cobalt'"),
        ({"config": "/nonexistent/train.toml"}, "config '/nonexistent/train.toml': no such file"),
        ({"run_dir": None}, "run_dir is required"),
        ({"account": "MY PROJ"}, "account 'MY PROJ'"),
        ({"queue": "prod\n#PBS -A other"}, "queue"),
        ({"job_name": "1job"}, "job_name '1job'"),
        ({"sets": ("epochs=3",)}, "--set 'epochs=3'"),
    ],
)
def test_invalid_specs_raise_naming_the_problem(site: Path, change: dict, message: str) -> None:
    with pytest.raises(ValueError) as info:
        render_jobscript(_spec(site, **change))
    assert message in str(info.value)
    assert "\n" not in str(info.value).replace("\\n", "")


def test_missing_venv_is_named(site: Path, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="venv .*no bin/activate"):
        render_jobscript(_spec(site, venv=str(tmp_path / "novenv")))


# -- behaviour: resubmission ----------------------------------------------------------------------------------

def _env(site: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SAGEPAIRS_", "PBS_", "SLURM_"))}
    env.update(PATH=f"{site / 'bin'}:{os.environ['PATH']}", FAKE_LOG=str(site / "logs"),
               PBS_O_WORKDIR=str(site), PBS_JOBID="1.fake", SLURM_SUBMIT_DIR=str(site), SLURM_JOB_ID="77")
    env.update(extra)
    return env


def _run(site: Path, script: Path, *, stdin_script: bool = False, **env: str) -> subprocess.CompletedProcess:
    """Runs the job like bash does under the scheduler: by path, or (PBS Pro) fed on stdin."""
    if stdin_script:
        with script.open() as fh:
            return subprocess.run(["bash"], stdin=fh, env=_env(site, **env), capture_output=True, text=True, timeout=15)
    return subprocess.run(["bash", str(script)], env=_env(site, **env), capture_output=True, text=True, timeout=15)


def _with_checkpoint(site: Path) -> None:
    ckpt = site / "runs" / "vicreg" / "checkpoints"
    ckpt.mkdir(parents=True, exist_ok=True)
    (ckpt / "last.pt").write_bytes(b"fake")


def _start_until_launched(site: Path, script: Path) -> subprocess.Popen:
    """Starts the job with a launcher that waits for SIGTERM; returns once the ranks are 'running'."""
    proc = subprocess.Popen(["bash", str(script)], env=_env(site, FAKE_WAIT_TERM="1"),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    args = site / "logs" / "launcher.args"
    deadline = time.monotonic() + 5
    while not args.exists() and time.monotonic() < deadline:
        time.sleep(0.02)
    assert args.exists(), "the fake launcher never started"
    return proc


def _calls(site: Path, tool: str) -> list[str]:
    path = site / "logs" / f"{tool}.calls"
    return path.read_text().splitlines() if path.exists() else []


def test_pbs_exit_143_with_checkpoint_resubmits_once(site: Path) -> None:
    _with_checkpoint(site)
    script = _write(site, render_jobscript(_spec(site)))
    result = _run(site, script, FAKE_EXIT="143")
    assert result.returncode == 0, result.stdout + result.stderr
    calls = _calls(site, "qsub")
    assert len(calls) == 1, calls
    assert calls[0].startswith("-v SAGEPAIRS_RESUBMIT=1,SAGEPAIRS_MAX_RESUBMIT=10,")
    assert calls[0].endswith(f"SAGEPAIRS_JOBSCRIPT={script} {script}")
    # The site's launcher, not the venv's, ran with the ranks, and the venv was active.
    args = (site / "logs" / "launcher.args").read_text().splitlines()
    assert args[:8] == ["-n", "8", "--ppn", "4", "--depth", "8", "--cpu-bind", "depth"]
    assert args[8:12] == ["training", "run", "--config", str(site / "train.toml")]
    assert (site / "logs" / "launcher.env").read_text().split() == ["OMP_NUM_THREADS=8", "VENV_ACTIVE=1"]
    assert (site / "runs" / "vicreg" / "job-logs").is_dir()
    assert "resubmitted as 4242.fake" in result.stdout


def test_pbs_finished_run_is_not_resubmitted(site: Path) -> None:
    _with_checkpoint(site)
    result = _run(site, _write(site, render_jobscript(_spec(site))), FAKE_EXIT="0")
    assert result.returncode == 0
    assert _calls(site, "qsub") == []


@pytest.mark.parametrize(
    ("exit_code", "checkpoint", "env", "says"),
    [
        ("1", True, {}, "exited 1, not stopped for wall time"),  # a crash would only crash again
        ("130", True, {}, "exited 130"),  # SIGINT: someone meant it
        ("143", False, {}, "to resume from"),  # no last.pt
        ("143", True, {"SAGEPAIRS_RESUBMIT": "10"}, "resubmitted 10 times already"),
        ("143", True, {"SAGEPAIRS_MAX_RESUBMIT": "0"}, "SAGEPAIRS_MAX_RESUBMIT=0"),
    ],
)
def test_pbs_other_stops_are_not_resubmitted(site: Path, exit_code: str, checkpoint: bool, env: dict, says: str) -> None:
    if checkpoint:
        _with_checkpoint(site)
    result = _run(site, _write(site, render_jobscript(_spec(site))), FAKE_EXIT=exit_code, **env)
    assert result.returncode == int(exit_code)
    assert _calls(site, "qsub") == []
    assert says in result.stdout


def test_pbs_fed_on_stdin_resubmits_the_rendered_path(site: Path) -> None:
    # PBS Pro hands the script to bash on stdin, so $0 is not the file: the rendered path is used.
    _with_checkpoint(site)
    script = _write(site, render_jobscript(_spec(site, script_path=str(site / "job.sh"))))
    result = _run(site, script, stdin_script=True, FAKE_EXIT="143")
    assert result.returncode == 0, result.stdout + result.stderr
    calls = _calls(site, "qsub")
    assert len(calls) == 1 and calls[0].endswith(f"SAGEPAIRS_JOBSCRIPT={script} {script}"), calls


def test_pbs_fed_on_stdin_without_a_path_says_how_to_resume(site: Path) -> None:
    _with_checkpoint(site)
    script = _write(site, render_jobscript(_spec(site)))
    result = _run(site, script, stdin_script=True, FAKE_EXIT="143")
    assert result.returncode == 143
    assert _calls(site, "qsub") == []
    assert "cannot resubmit" in result.stdout and "SAGEPAIRS_JOBSCRIPT" in result.stdout
    # ... and SAGEPAIRS_JOBSCRIPT, set at qsub time, is enough.
    result = _run(site, script, stdin_script=True, FAKE_EXIT="143", SAGEPAIRS_JOBSCRIPT=str(script))
    assert result.returncode == 0 and len(_calls(site, "qsub")) == 1


def test_pbs_timer_stops_the_ranks_before_the_wall_time_and_resubmits(site: Path) -> None:
    _with_checkpoint(site)
    script = _write(site, render_jobscript(_spec(site, walltime="00:00:03")))
    started = time.monotonic()
    result = _run(site, script, FAKE_WAIT_TERM="1", SAGEPAIRS_STOP_MARGIN="2")  # stop 1 s in
    assert time.monotonic() - started < 5
    assert result.returncode == 0, result.stdout + result.stderr
    assert (site / "logs" / "launcher.signals").read_text().split() == ["TERM"]
    assert "wall time nearly spent" in result.stdout
    assert len(_calls(site, "qsub")) == 1


def test_pbs_job_told_to_stop_forwards_term_and_does_not_resubmit(site: Path) -> None:
    # qdel: TERM reaches this shell; the ranks still get it (to save last.pt) but the chain ends.
    _with_checkpoint(site)
    script = _write(site, render_jobscript(_spec(site)))
    proc = _start_until_launched(site, script)
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=10)
    assert proc.returncode == 143, out
    assert (site / "logs" / "launcher.signals").read_text().split() == ["TERM"]
    assert _calls(site, "qsub") == []


def test_slurm_exit_143_requeues_once_and_respects_the_limit(site: Path) -> None:
    _with_checkpoint(site)
    script = _write(site, render_jobscript(_spec(site, "slurm")))
    result = _run(site, script, FAKE_EXIT="143")
    assert result.returncode == 0, result.stdout + result.stderr
    assert _calls(site, "scontrol") == ["requeue 77"]
    args = (site / "logs" / "launcher.args").read_text().splitlines()
    assert args[:5] == ["--nodes=2", "--ntasks=8", "--ntasks-per-node=4", "--cpus-per-task=8", "--cpu-bind=cores"]
    result = _run(site, script, FAKE_EXIT="143", SLURM_RESTART_COUNT="10")
    assert result.returncode == 143
    assert _calls(site, "scontrol") == ["requeue 77"]
    result = _run(site, script, FAKE_EXIT="0")
    assert result.returncode == 0 and _calls(site, "scontrol") == ["requeue 77"]


def test_slurm_warning_signal_stops_the_ranks_and_requeues(site: Path) -> None:
    # --signal=B:USR1@N: Slurm warns the batch shell alone; the shell passes SIGTERM on to srun and requeues.
    _with_checkpoint(site)
    script = _write(site, render_jobscript(_spec(site, "slurm")))
    proc = _start_until_launched(site, script)
    proc.send_signal(signal.SIGUSR1)
    out, _ = proc.communicate(timeout=10)
    assert proc.returncode == 0, out
    assert (site / "logs" / "launcher.signals").read_text().split() == ["TERM"]
    assert _calls(site, "scontrol") == ["requeue 77"]
