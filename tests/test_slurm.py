"""SLURM launchers against a real private SLURM cluster: submitit jobs, requeue, sbatch template.

Every job here is a real sbatch job on the dev cluster (slurm/dev-cluster/); the comparisons are
bitwise against an uninterrupted SLURM run of the same config with the same world size.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import REPO, TINY, assert_same_run, cli_env, final_state
from slurm_cluster import cluster_unavailable_reason, slurm_cluster

from ddp_diffusion import checkpoint
from ddp_diffusion.submit_options import SubmitOptions

pytestmark = pytest.mark.slow

STEPS = 40
DONE_STATES = ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY")


def train_args(data: Path, out: Path, *extra: str) -> list[str]:
    """Tiny training overrides: every step logged, checkpoints only when stopped and at the end."""
    return [*TINY, f"data.root={data}", f"out_dir={out}", f"train.max_steps={STEPS}",
            "train.log_every=1", "train.ckpt_every=1000", *extra]


def submit(folder: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    """Run launch/submit.py (the real CLI) with the cluster's environment."""
    proc = subprocess.run([sys.executable, str(REPO / "launch" / "submit.py"), "--folder",
                           str(folder), "--time", "30", *args], capture_output=True, text=True,
                          env=cli_env(), cwd=REPO, timeout=300)
    if check and proc.returncode != 0:
        raise AssertionError(f"submit exit {proc.returncode}\n{proc.stdout}\n{proc.stderr}")
    return proc


def job_id_of(stdout: str) -> str:
    """The job id that `submit` printed."""
    m = re.search(r"^submitted job (\d+) ", stdout, re.MULTILINE)
    assert m, stdout
    return m.group(1)


def sacct_state(job_id: str) -> str:
    """The job's state in SLURM's accounting (the latest run after a requeue)."""
    out = subprocess.run(["sacct", "-j", job_id, "-X", "-n", "-P", "-o", "State"],
                         capture_output=True, text=True).stdout.split()
    return out[-1] if out else "UNKNOWN"


def wait_for_results(folder: Path, job_id: str, ntasks: int, timeout: float = 400) -> list:
    """Every task's return value, once each task of the submitit job wrote its result file."""
    import submitit

    tasks = [submitit.SlurmJob(folder, job_id, tasks=(i,)) for i in range(ntasks)]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if all(t.paths.result_pickle.exists() for t in tasks):
            return [t.result() for t in tasks]
        time.sleep(1)
    log = tasks[0].paths.stderr
    raise AssertionError(f"job {job_id} not done in {timeout} s (state {sacct_state(job_id)})\n"
                         f"{log.read_text()[-4000:] if log.exists() else ''}")


def wait_for_sacct(job_id: str, log: Path, timeout: float = 400) -> str:
    """The final state of a plain sbatch job."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        state = sacct_state(job_id)
        if state.split()[0] in DONE_STATES:
            return state
        time.sleep(1)
    raise AssertionError(f"job {job_id} not done in {timeout} s\n{log.read_text()[-4000:]}")


def wait_for_metrics_step(run: Path, step: int, timeout: float = 300) -> None:
    """Block until the running job's metrics.jsonl records `step`."""
    metrics = run / "metrics.jsonl"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        lines = metrics.read_text().splitlines() if metrics.is_file() else []
        try:
            if lines and json.loads(lines[-1])["step"] >= step:
                return
        except json.JSONDecodeError:  # a line half-written
            pass
        time.sleep(0.05)
    raise AssertionError(f"{metrics}: step {step} not reached in {timeout} s")


def steps_of(run: Path) -> list[int]:
    return [s for s, _ in checkpoint.list_checkpoints(run / "checkpoints")]


@pytest.fixture(scope="module")
def cluster() -> Iterator[dict[str, str]]:
    """A real one-node SLURM cluster for this module; its SLURM_CONF is in os.environ."""
    reason = cluster_unavailable_reason()
    if reason:
        pytest.skip(reason)
    base = Path(tempfile.mkdtemp(prefix="slurm-", dir="/tmp"))
    saved = dict(os.environ)
    try:
        with slurm_cluster(nodes=1, base_dir=base) as env:
            os.environ.update(env)
            yield env
    finally:
        os.environ.clear()
        os.environ.update(saved)


@pytest.fixture(scope="module")
def reference(cluster: dict[str, str], tiny_data: Path,
              tmp_path_factory: pytest.TempPathFactory) -> dict:
    """An uninterrupted 1-node x 2-task job submitted through launch/submit.py."""
    tmp = tmp_path_factory.mktemp("reference")
    out = tmp / "run"
    proc = submit(tmp / "submitit", "--tasks-per-node", "2", *train_args(tiny_data, out))
    job_id = job_id_of(proc.stdout)
    results = wait_for_results(tmp / "submitit", job_id, 2)
    return {"out": out, "stdout": proc.stdout, "job_id": job_id, "results": results,
            "log": (tmp / "submitit" / f"{job_id}_0_log.err").read_text(),
            "script": (tmp / "submitit" / f"{job_id}_submission.sh").read_text()}


def test_submit_trains_to_max_steps_with_loss_logged(reference: dict) -> None:
    out, stdout, job_id = reference["out"], reference["stdout"], reference["job_id"]
    assert reference["results"] == [0, 0]
    # What submit prints: the job id, the log paths (which exist), how to follow it.
    assert "world size 2" in stdout and f"squeue -j {job_id}" in stdout
    log_path = re.search(r"training log \(rank 0\): (\S+)", stdout).group(1)
    assert Path(log_path).is_file() and f"tail -F {log_path}" in stdout
    assert "world size 2 (1 node(s))" in reference["log"]
    # A task that fails ends the job step instead of leaving the others in a collective.
    assert re.search(r"^srun .*--kill-on-bad-exit=1", reference["script"], re.MULTILINE)
    assert steps_of(out) == [STEPS]
    state = final_state(out)
    assert state["step"] == STEPS and state["world_size"] == 2
    last = json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])
    assert last["step"] == STEPS and 0 < last["loss"] < 1


STREAM = ("data.loader=stream", "data.num_workers=2")  # the memory loader's batches, bit for bit


@pytest.mark.parametrize(("how", "loader"), [
    ("submitit_interrupt", ()), ("scontrol_requeue", STREAM), ("scancel_term", STREAM)])
def test_preempted_job_is_requeued_and_resumes_exactly(reference: dict, tiny_data: Path,
                                                       tmp_path: Path, how: str,
                                                       loader: tuple[str, ...]) -> None:
    """SLURM signals every process of the job step, the stream loader's workers too."""
    import submitit

    out = tmp_path / "run"
    proc = submit(tmp_path / "submitit", "--tasks-per-node", "2",
                  *train_args(tiny_data, out, "tracking.wandb=offline", *loader))
    job_id = job_id_of(proc.stdout)
    wait_for_metrics_step(out, 3)
    if how == "submitit_interrupt":  # SIGTERM then USR2 to the steps; the job stays RUNNING
        submitit.SlurmJob(tmp_path / "submitit", job_id, tasks=(0, 1))._interrupt()
    elif how == "scancel_term":  # SIGTERM to every process of the job's steps
        subprocess.run(["scancel", "--signal=TERM", job_id], check=True)
    else:  # what an admin or preemption does: SIGTERM, and SLURM requeues the job itself
        subprocess.run(["scontrol", "requeue", job_id], check=True)
    assert wait_for_results(tmp_path / "submitit", job_id, 2) == [0, 0]

    log = (tmp_path / "submitit" / f"{job_id}_0_log.err").read_text()
    stopped_at, final = steps_of(out)
    assert 3 <= stopped_at < final == STEPS
    assert f"resuming from {checkpoint.path_for(out / 'checkpoints', stopped_at)} " \
           f"(step {stopped_at})" in log
    assert "killed by signal" not in log  # no loader worker died of it
    if how != "scontrol_requeue":
        assert "stopped by a signal while still RUNNING" in log
        assert "requeueing it (requeue 1 of at most 10)" in log
    else:
        assert "SLURM is ending the job (state COMPLETING)" in log
    assert "requeued 1 time(s) so far" in log and "SLURM restart count 1" in log
    # Same W&B run before and after the requeue: in the checkpoints and in W&B's own folders.
    run_id = checkpoint.read(checkpoint.path_for(out / "checkpoints", stopped_at))["progress"][
        "run_id"]
    assert final_state(out)["progress"]["run_id"] == run_id
    runs = sorted(p.name for p in (out / "wandb").glob("offline-run-*"))
    assert len(runs) == 2 and all(name.endswith(f"-{run_id}") for name in runs), runs
    assert_same_run(reference["out"], out)


def test_train_sbatch_two_tasks_end_to_end_with_requeue(reference: dict, tiny_data: Path,
                                                        tmp_path: Path) -> None:
    out, log = tmp_path / "run", tmp_path / "job.out"
    env = {**cli_env(), "NPROC_PER_NODE": "2"}
    proc = subprocess.run(["sbatch", "--parsable", f"--output={log}",
                           str(REPO / "slurm" / "train.sbatch"), *train_args(tiny_data, out)],
                          capture_output=True, text=True, env=env, cwd=REPO, check=True)
    job_id = proc.stdout.strip().split(";")[0]
    wait_for_metrics_step(out, 3)
    # The time-limit warning (--signal=B:USR2@120), sent now: the trap saves and requeues.
    subprocess.run(["scancel", "--batch", "--signal=USR2", job_id], check=True)
    assert wait_for_sacct(job_id, log) == "COMPLETED", log.read_text()[-4000:]
    text = log.read_text()
    stopped_at, final = steps_of(out)
    assert 3 <= stopped_at < final == STEPS
    assert "got SIGUSR2; forwarding SIGTERM to the trainers" in text
    assert "requeueing (requeue 1 of at most 10)" in text
    assert f"(step {stopped_at})" in text and "training exited with 0" in text
    assert final_state(out)["world_size"] == 2
    assert_same_run(reference["out"], out)


def test_bad_partition_or_impossible_request_fails_at_submit(cluster: dict[str, str],
                                                             tmp_path: Path) -> None:
    proc = submit(tmp_path / "a", "--partition", "nope", "train.max_steps=2", check=False)
    assert proc.returncode == 2, proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error: sbatch refused the job:") and "invalid partition" in last
    proc = submit(tmp_path / "b", "--mem", "100000G", "train.max_steps=2", check=False)
    assert proc.returncode == 2, proc.stderr
    assert "Requested node configuration is not available" in proc.stderr.strip().splitlines()[-1]
    # sbatch accepts 3 nodes of a 1-node partition (pending for ever): submit cancels and says so.
    proc = submit(tmp_path / "d", "--nodes", "3", "train.max_steps=2", check=False)
    assert proc.returncode == 2, proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error: SLURM cannot ever run this request")
    assert "PartitionConfig" in last
    proc = submit(tmp_path / "c", "--tasks-per-node", "5", "train.batch_size=16", check=False)
    assert proc.returncode == 2
    assert "not divisible by world size 5" in proc.stderr.strip().splitlines()[-1]
    queued = subprocess.run(["squeue", "-h"], capture_output=True, text=True, check=True)
    assert queued.stdout.strip() == ""  # nothing was submitted


def test_two_nodes_one_task_each_train_with_world_size_two(reference: dict, tiny_data: Path,
                                                           tmp_path: Path,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    base = Path(tempfile.mkdtemp(prefix="slurm-", dir="/tmp"))
    with slurm_cluster(nodes=2, base_dir=base) as env:
        for key, value in env.items():
            monkeypatch.setenv(key, value)
        out, folder = tmp_path / "run", tmp_path / "submitit"
        proc = submit(folder, "--nodes", "2", "--tasks-per-node", "1",
                      *train_args(tiny_data, out))
        job_id = job_id_of(proc.stdout)
        assert wait_for_results(folder, job_id, 2) == [0, 0]
    log = (folder / f"{job_id}_0_log.err").read_text()
    host = subprocess.run(["hostname", "-s"], capture_output=True, text=True).stdout.strip()
    assert f"world size 2 (2 node(s)), rendezvous {host}-node1:" in log
    assert "node=1(2), global_rank=1(2)" in (folder / f"{job_id}_1_log.out").read_text()
    state = final_state(out)
    assert state["world_size"] == 2
    assert_same_run(reference["out"], out)  # 2 nodes x 1 = 1 node x 2, bit for bit


def test_submit_options_reach_the_job_script(tmp_path: Path) -> None:
    """Every option SLURM sees is a line of the script submitit writes (nothing submitted)."""
    if shutil.which("sbatch") is None or shutil.which("srun") is None:
        pytest.skip("no SLURM client commands (sbatch, srun)")
    from ddp_diffusion.slurm import build_executor

    def sbatch_lines(opts: SubmitOptions) -> set[str]:
        executor = build_executor(opts, str(tmp_path))
        script = executor._executor._make_submission_file_text("true", "uid")
        return {line for line in script.splitlines() if line.startswith("#SBATCH")}

    lines = sbatch_lines(SubmitOptions(
        nodes=4, gpus_per_node=8, cpus_per_task=6, partition="gpu", account="proj", qos="high",
        time="1-00:30", mem="480G", constraint="a100", exclude="n1", job_name="fm",
        sbatch={"mail-type": "END", "exclusive": True}, signal_delay_s=60))
    assert {f"#SBATCH --{line}" for line in (
        "nodes=4", "ntasks-per-node=8", "gpus-per-node=8", "cpus-per-task=6", "partition=gpu",
        "account=proj", "qos=high", "time=1470", "mem=480G", "constraint=a100", "exclude=n1",
        "job-name=fm", "mail-type=END", "exclusive", "signal=USR2@60", "requeue")} <= lines
    lines = sbatch_lines(SubmitOptions(tasks_per_node=2))  # a CPU job: no GPU line at all
    assert "#SBATCH --ntasks-per-node=2" in lines
    assert not any("gpu" in line for line in lines), lines


def test_a_sweep_is_one_job_array_whose_preempted_point_is_requeued_and_all_finish(
        cluster: dict[str, str], tiny_data: Path, tmp_path: Path) -> None:
    import yaml

    out, folder = tmp_path / "grid", tmp_path / "submitit"
    proc = submit(folder, "--sweep", "train.lr=1e-3,2e-3", "--sweep", "model.dropout=0,0.1",
                  "--max-parallel", "2", *train_args(tiny_data, out))
    m = re.search(r"^submitted job array (\d+): 4 point\(s\) of world size 1, at most 2 at "
                  r"once", proc.stdout, re.MULTILINE)
    assert m, proc.stdout
    array = m.group(1)
    assert "#SBATCH --array=0-3%2" in (folder / f"{array}_submission.sh").read_text()
    record = yaml.safe_load((out / "sweep.yaml").read_text())
    names = [p["name"] for p in record["points"]]
    assert names == ["train.lr=1e-3,model.dropout=0", "train.lr=1e-3,model.dropout=0.1",
                     "train.lr=2e-3,model.dropout=0", "train.lr=2e-3,model.dropout=0.1"]
    assert [p["job"] for p in record["points"]] == [f"{array}_{i}" for i in range(4)]

    wait_for_metrics_step(out / names[0], 3)
    subprocess.run(["scontrol", "requeue", f"{array}_0"], check=True)  # as preemption does
    assert [wait_for_results(folder, f"{array}_{i}", 1) for i in range(4)] == [[0]] * 4

    log = (folder / f"{array}_0_0_log.err").read_text()
    stopped_at, final = steps_of(out / names[0])
    assert 3 <= stopped_at < final == STEPS and f"(step {stopped_at})" in log
    for name, (lr, dropout) in zip(names, [(1e-3, 0), (1e-3, 0.1), (2e-3, 0), (2e-3, 0.1)],
                                   strict=True):
        cfg = final_state(out / name)["config"]
        assert steps_of(out / name)[-1] == STEPS
        assert (cfg["train"]["lr"], cfg["model"]["dropout"]) == (lr, dropout)
        assert (cfg["tracking"]["name"], cfg["tracking"]["group"]) == (name, "grid")
    status = subprocess.run([sys.executable, "-m", "ddp_diffusion", "sweep-status", str(out)],
                            capture_output=True, text=True, cwd=REPO, check=True).stdout
    rows = status.splitlines()[2:]
    assert [r.split()[0] for r in rows] == names
    assert all(r.split()[1] == f"{STEPS}/{STEPS}" for r in rows), status
    last_loss = json.loads((out / names[3] / "metrics.jsonl").read_text().splitlines()[-1])
    assert rows[3].split()[2] == f"{last_loss['loss']:.4f}"

    # Other points in the same folder are refused before anything is submitted.
    again = submit(folder, "--sweep", "train.lr=5e-3", *train_args(tiny_data, out), check=False)
    assert again.returncode == 2
    assert again.stderr.strip().splitlines()[-1].startswith(
        f"error: {out / 'sweep.yaml'} records another sweep (4 points: ")


@pytest.mark.parametrize(("flags", "message"), [
    (["--sweep", "train.lr"], "--sweep 'train.lr' must look like KEY=V1,V2,..."),
    (["--sweep", "train.lr=1,", "train.max_steps=2"], "--sweep 'train.lr=1,' must look like"),
    (["--sweep", "train.lr=1,1"], "--sweep 'train.lr=1,1' repeats a value"),
    (["--sweep", "train.lr=1", "--sweep", "train.lr=2"], "--sweep train.lr is given twice"),
    (["--sweep", "train.lrr=1,2"], "unknown config key 'train.lrr'; did you mean 'train.lr'?"),
    (["--max-parallel", "2"], "--max-parallel limits a --sweep's points"),
])
def test_bad_sweeps_are_one_line_before_anything_is_submitted(tmp_path: Path, flags: list[str],
                                                              message: str) -> None:
    proc = submit(tmp_path / "s", *flags, f"out_dir={tmp_path / 'o'}", check=False)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith(f"error: {message}")
    assert not (tmp_path / "o").exists() and not (tmp_path / "s").exists()
