"""The job path on a real two-node Ray cluster on this machine, with token authentication on.

``ray start --head`` (custom resource ``learner``) and ``ray start --address`` (custom resource ``rollout``) run as
two raylets: two Ray nodes. A short training job goes through the Jobs API (the dashboard's job server, with the
token); the learner must land on the head and the rollout actors on the worker. A job with a bad config must end
FAILED with the one-line error in its logs. The cluster is stopped even when a test fails.
"""

from __future__ import annotations

import json
import os
import secrets
import shlex
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil
import pytest
from ray.util import get_node_ip_address

from softflow import checkpoints

RAY = Path(sys.executable).with_name("ray")
EXPERIMENT = Path(__file__).resolve().parents[2] / "cluster" / "experiments" / "inverted-pendulum.yaml"
SHORT_RUN = ["total_env_steps=400", "log_every_steps=100", "learner.learning_starts=100",
             "learner.checkpoint_every=100", "eval.every_steps=200", "eval.episodes=1", "algorithm.batch_size=32",
             "actors.num_cpus=0.5", "learner.num_cpus=0.5", "replay.updates_per_step=0.25",
             "actors.resources={rollout: 1}", "learner.resources={learner: 1}", "wandb.mode=offline"]

WORKER_ATTEMPTS = 3

pytestmark = [pytest.mark.timeout(900), pytest.mark.ray]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def agent_ports() -> list[str]:
    """Ports of one node's agents. Ray's dashboard agent listens on 52365 unless told otherwise, so two nodes (or any
    other Ray) on one machine would race for it, and the loser's job agent never registers: the Jobs API then answers
    "No available agent" for good. Each node gets free ports of its own."""
    return [f"--dashboard-agent-listen-port={free_port()}", f"--dashboard-agent-grpc-port={free_port()}",
            f"--runtime-env-agent-port={free_port()}", f"--metrics-export-port={free_port()}"]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """(dashboard address, environment with the token) of a running two-node cluster; torn down afterwards."""
    root = tmp_path_factory.mktemp("cluster")
    token_path = root / "auth_token"
    token_path.write_text(secrets.token_hex(32))
    token_path.chmod(0o600)
    env = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(token_path),
           "OMP_NUM_THREADS": "1", "PATH": f"{RAY.parent}{os.pathsep}{os.environ['PATH']}"}
    env.pop("RAY_ADDRESS", None)
    gcs_port, dashboard_port = free_port(), free_port()
    common = ["--block", "--disable-usage-stats", "--num-cpus=2"]
    head_log, worker_log = root / "head.log", root / "worker.log"
    # Ray's unix sockets live under --temp-dir and their paths must stay under 107 bytes: pytest's tmp paths are
    # too long for that, so the cluster gets a short directory of its own.
    ray_dir = Path(tempfile.mkdtemp(prefix="sf-ray-", dir="/tmp"))
    head = subprocess.Popen(
        [str(RAY), "start", "--head", f"--port={gcs_port}", "--include-dashboard=true",
         "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard_port}", "--resources={\"learner\": 1}",
         f"--temp-dir={ray_dir}", *agent_ports(), *common],
        env=env, stdout=head_log.open("w"), stderr=subprocess.STDOUT)
    processes = [head]
    try:
        address = f"http://127.0.0.1:{dashboard_port}"
        wait_for(lambda: port_open(dashboard_port), 180, "the head's dashboard", head_log)
        wait_for(lambda: len(alive_nodes(address, env)) == 1, 180, "the head's GCS to list the head", head_log)
        worker_command = [str(RAY), "start", f"--address={get_node_ip_address()}:{gcs_port}",
                          "--resources={\"rollout\": 2}", *agent_ports(), *common]
        for _ in range(WORKER_ATTEMPTS):
            # Under load (CI beside other jobs) a worker can give up on the GCS before it answers and exit: it is
            # started again, up to WORKER_ATTEMPTS times, rather than failing the job tests for a slow start.
            worker = subprocess.Popen(worker_command, env=env, stdout=worker_log.open("a"), stderr=subprocess.STDOUT)
            processes.append(worker)
            wait_for(lambda: worker.poll() is not None or len(alive_nodes(address, env)) == 2, 180,
                     "the worker node to join", worker_log)
            if worker.poll() is None:
                break
        else:
            raise RuntimeError(f"the worker node exited {WORKER_ATTEMPTS} times\n{worker_log.read_text()[-3000:]}")
        yield address, env
    finally:
        stop(processes)
        shutil.rmtree(ray_dir, ignore_errors=True)


def port_open(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


def wait_for(condition, timeout_s: float, what: str, log: Path | None = None) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            tail = log.read_text()[-3000:] if log is not None and log.exists() else ""
            raise TimeoutError(f"waited {timeout_s:g} s for {what}\n{tail}")
        time.sleep(1.0)


def alive_nodes(address: str, env: dict) -> list[str]:
    result = subprocess.run([str(RAY), "list", "nodes", "--address", address, "--filter", "state=ALIVE",
                             "--format", "json"], env=env, capture_output=True, text=True, timeout=60)
    try:
        return [node["node_id"] for node in json.loads(result.stdout)]
    except json.JSONDecodeError:  # the dashboard is up but its state API not yet
        return []


def stop(processes: list[subprocess.Popen]) -> None:
    """SIGTERM to each ``ray start --block`` (it stops what it started), then SIGKILL whatever is left."""
    children = [child for p in processes if p.poll() is None
                for child in psutil.Process(p.pid).children(recursive=True)]
    for p in processes:
        p.terminate()
    for p in processes:
        try:
            p.wait(timeout=30)
        except subprocess.TimeoutExpired:
            p.kill()
    for child in children:
        if child.is_running():
            child.kill()


def submit(address: str, env: dict, entrypoint: str) -> tuple[str, str]:
    """Submits through the Jobs API with the token as a bearer header and waits for the end; (status, logs)."""
    from ray.job_submission import JobSubmissionClient

    token = Path(env["RAY_AUTH_TOKEN_PATH"]).read_text().strip()
    client = JobSubmissionClient(address, headers={"Authorization": f"Bearer {token}"})
    deadline = time.monotonic() + 180
    while True:  # the job agent of a fresh head answers "no available agent" until it has registered
        try:
            job_id = client.submit_job(entrypoint=entrypoint, runtime_env={"env_vars": {"OMP_NUM_THREADS": "1"}})
            break
        except RuntimeError as exc:
            if "No available agent" not in str(exc) or time.monotonic() > deadline:
                raise
            time.sleep(2.0)
    wait_for(lambda: client.get_job_status(job_id).is_terminal(), 300, f"job {job_id}")
    return str(client.get_job_status(job_id).value), client.get_job_logs(job_id)


def train_command(run_dir: Path, *overrides: str) -> str:
    return shlex.join([sys.executable, "-m", "softflow.deploy.cli", "train", str(EXPERIMENT), *SHORT_RUN,
                       *overrides, "--run-dir", str(run_dir), "--no-progress"])


def test_a_job_trains_across_both_nodes(cluster, tmp_path):
    address, env = cluster
    run_dir = tmp_path / "run"
    status, logs = submit(address, env, train_command(run_dir))
    assert status == "SUCCEEDED", logs
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert rows[-1]["env_steps"] == summary["env_steps"] == 400 and summary["updates"] > 0
    assert checkpoints.newest_set(run_dir / "checkpoints")[0] is not None
    assert list((run_dir / "wandb").glob("offline-run-*/*.wandb")), "the offline W&B run"
    placement = summary["placement"]
    head, worker = placement["learner"], placement["actors"][0]
    assert placement["replay"] == head, "the replay actor sits beside the learner"
    assert set(placement["actors"]) == {worker} and worker != head, "actors on the rollout node"
    assert set(alive_nodes(address, env)) == {head, worker}


def test_a_job_with_a_bad_config_fails_with_the_one_line_error(cluster, tmp_path):
    address, env = cluster
    status, logs = submit(address, env, train_command(tmp_path / "run", "actors.cout=3"))
    assert status == "FAILED"
    errors = [line for line in logs.splitlines() if line.startswith("softflow: error:")]
    assert errors == ["softflow: error: actors.cout: unknown key (check the spelling; see the documented fields "
                      "of this section)"], logs
    assert "Traceback" not in logs
