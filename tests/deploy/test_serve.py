"""The gRPC policy server on loopback, serving a tiny ISFM policy trained by the test: answers equal
``softflow.load_policy(...).act`` for the same seed, concurrent calls are batched with each caller getting its own
rows, a run directory's new checkpoints are swapped in while a client keeps asking, and the ``softflow serve`` /
``softflow act`` commands. Hostile input is in test_serve_hostile.py."""

from __future__ import annotations

import concurrent.futures
import gc
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import CANDIDATES, OBS_DIM, train_tiny_run

import softflow
from softflow import checkpoints
from softflow.deploy import PolicyClient
from softflow.deploy.cli import main
from softflow.deploy.serve.server import GC_YOUNG_THRESHOLD, PolicyServer, ServeOptions, settle_garbage_collector

pytestmark = [pytest.mark.grpc, pytest.mark.usefixtures("one_torch_thread")]


def observations(rows: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).normal(0, 0.1, (rows, OBS_DIM)).astype(np.float32)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    return train_tiny_run(tmp_path_factory.mktemp("serve-run"))


@pytest.fixture(scope="module")
def server(run_dir):
    with PolicyServer(run_dir, ServeOptions(port=0, reload_interval_s=0, max_batch_wait_ms=5.0)) as server:
        yield server


@pytest.fixture
def client(server):
    with PolicyClient(server.address) as client:
        yield client


def test_seeded_answers_equal_load_policy_act(run_dir, client):
    policy = softflow.load_policy(run_dir)
    for seed, rows in ((0, 1), (7, 5), (2**40 + 3, 64)):
        obs = observations(rows, seed % 1000)
        torch.manual_seed(seed)
        expected = policy.act(obs)
        np.testing.assert_array_equal(client.act(obs, seed=seed), expected)
        np.testing.assert_array_equal(client.act(obs.astype(np.float64), seed=seed), expected)
    torch.manual_seed(11)
    np.testing.assert_array_equal(client.act(obs[0], seed=11), policy.act(obs[0]))  # (obs_dim,) -> (act_dim,)
    # best-of-N: the answer is one of the policy's candidates, the one the critic scores highest
    answer = client.query(obs[:1], seed=5)
    torch.manual_seed(5)
    candidates = torch.as_tensor(policy.sample(obs[:1], CANDIDATES))
    q = policy.algorithm.critic.min_q(torch.as_tensor(obs[:1]).expand(CANDIDATES, -1), candidates[0])
    np.testing.assert_array_equal(answer.actions[0], candidates[0, q.argmax()].numpy())
    assert answer.candidates == CANDIDATES


def test_deterministic_answers_are_the_zero_noise_action(run_dir, client):
    policy = softflow.load_policy(run_dir)
    obs = observations(6)
    expected = policy.algorithm.act(obs, False, 1)
    np.testing.assert_array_equal(client.act(obs, deterministic=True), expected)
    np.testing.assert_array_equal(client.act(obs, candidates=1), expected)
    unseeded = client.act(obs)
    assert unseeded.shape == (6, 1) and np.all(np.abs(unseeded) <= 3.0)


def test_info_and_health_describe_the_checkpoint(run_dir, client):
    state = newest_checkpoint(run_dir)
    info = client.info()
    assert info["env_id"] == "InvertedPendulum-v5" and info["algorithm"] == "isfm"
    assert info["observation_space"] == {"shape": [OBS_DIM], "low": [], "high": []}
    assert info["action_space"] == {"shape": [1], "low": state["spaces"]["low"], "high": state["spaces"]["high"]}
    assert info["checkpoint_version"] == state["version"] > 1 and info["checkpoint_updates"] == state["updates"]
    assert abs(state["updates"] - 200) <= 1  # one per env step after 100, within the rate limiter's tolerance
    assert info["default_candidates"] == CANDIDATES and info["device"] == "cpu"
    assert (info["max_batch_rows"], info["max_batch_wait_ms"], info["max_request_rows"]) == (256, 5.0, 1024)
    assert client.health() == "SERVING" and client.health("") == "SERVING"


def test_concurrent_calls_share_policy_calls_and_each_gets_its_own_rows(run_dir, server):
    """Deterministic calls batched together get their own rows; seeded calls among them still get exactly what
    load_policy gives under their seed."""
    policy = softflow.load_policy(run_dir)
    batcher = server.batcher
    calls_before, served_before = batcher.policy_calls, batcher.queries_served
    requests = [(observations(1 + i % 3, seed=100 + i), i if i % 8 == 0 else None) for i in range(48)]

    def ask(request):
        obs, seed = request
        return client.act(obs, seed=seed) if seed is not None else client.act(obs, deterministic=True)

    with PolicyClient(server.address) as client, concurrent.futures.ThreadPoolExecutor(16) as pool:
        answers = list(pool.map(ask, requests))
    for (obs, seed), answer in zip(requests, answers):
        if seed is None:
            np.testing.assert_allclose(answer, policy.algorithm.act(obs, False, 1), rtol=0, atol=1e-6)
        else:
            torch.manual_seed(seed)
            np.testing.assert_array_equal(answer, policy.act(obs))
    calls = batcher.policy_calls - calls_before
    assert batcher.queries_served - served_before == len(requests)
    assert calls < len(requests), f"{len(requests)} concurrent requests took {calls} policy calls"


def test_the_batch_wait_is_for_concurrent_callers_only(run_dir):
    obs = observations(1)
    with PolicyServer(run_dir, ServeOptions(port=0, reload_interval_s=0, max_batch_wait_ms=300)) as server, \
            PolicyClient(server.address) as client:
        client.act(obs)
        start = time.monotonic()
        for _ in range(5):
            client.act(obs)
        assert time.monotonic() - start < 1.0, "a lone caller waited for company"
        calls_before = server.batcher.policy_calls
        together = threading.Barrier(8)  # two rounds of 8 callers released at once, so that the calls overlap

        def ask(_):
            together.wait()
            return client.act(obs)

        with concurrent.futures.ThreadPoolExecutor(8) as pool:
            list(pool.map(ask, range(16)))
        # the first call of the first round goes alone; the 300 ms wait gathers the rest into a few calls, not 16
        assert server.batcher.policy_calls - calls_before < 8


def newest_checkpoint(run_dir: Path) -> dict:
    return checkpoints.load(checkpoints.newest_set(run_dir / "checkpoints")[0] / checkpoints.LEARNER_FILE)


def write_new_checkpoint(run_dir: Path, version: int) -> None:
    """What training does: the networks moved on (here: policy weights scaled), in a new checkpoint set."""
    state = newest_checkpoint(run_dir)
    state["version"] = version
    state["algorithm"]["policy"] = {k: v * 1.5 for k, v in state["algorithm"]["policy"].items()}
    staging = checkpoints.staging_path(run_dir / "checkpoints", 10**9 + version)
    staging.mkdir()
    torch.save(state, staging / checkpoints.LEARNER_FILE)
    checkpoints.commit_set(staging, 10**9 + version, state["updates"], keep=2)


def test_reload_swaps_in_new_checkpoints_without_failing_a_request(run_dir, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(run_dir, run)
    obs = observations(2)
    old_action = softflow.load_policy(run).algorithm.act(obs, False, 1)
    versions, answers, errors, stop = [], [], [], threading.Event()
    with PolicyServer(run, ServeOptions(port=0, reload_interval_s=0.05)) as server, \
            PolicyClient(server.address) as client:

        def keep_asking() -> None:
            while not stop.is_set():
                try:
                    answer = client.query(obs, deterministic=True)
                except Exception as exc:
                    errors.append(exc)
                    return
                versions.append(answer.checkpoint_version)
                answers.append(answer.actions)

        asker = threading.Thread(target=keep_asking)
        asker.start()
        time.sleep(0.3)
        trained = newest_checkpoint(run)["version"]
        write_new_checkpoint(run, version=trained + 1)
        new_action = softflow.load_policy(run).algorithm.act(obs, False, 1)
        deadline = time.monotonic() + 20
        while client.info()["checkpoint_version"] != trained + 1 and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(0.3)
        broken = checkpoints.staging_path(run / "checkpoints", 2 * 10**9)  # a whole set whose learner.pt is junk:
        broken.mkdir()                                                      # refused, trained + 1 goes on serving
        (broken / checkpoints.LEARNER_FILE).write_bytes(b"not a checkpoint")
        checkpoints.commit_set(broken, 2 * 10**9, 0, keep=3)
        time.sleep(0.5)
        stop.set()
        asker.join(timeout=30)
        final_version = client.info()["checkpoint_version"]
    assert not errors and final_version == trained + 1
    assert versions[0] == trained and versions[-1] == trained + 1 and versions == sorted(versions)
    np.testing.assert_array_equal(answers[0], old_action)
    np.testing.assert_array_equal(answers[-1], new_action)
    assert not np.allclose(new_action, old_action)


def test_serve_and_act_commands(run_dir, tmp_path, capsys):
    token_file = tmp_path / "token"
    token_file.write_text(os.urandom(16).hex() + "\n")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    server = subprocess.Popen([sys.executable, "-m", "softflow.deploy.cli", "serve", str(run_dir), "--port", "0",
                               "--token-file", str(token_file)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True, env=env)
    try:
        line = server.stdout.readline()
        version = newest_checkpoint(run_dir)["version"]
        assert re.match(rf"softflow: serving .*learner\.pt \(isfm on InvertedPendulum-v5, version {version}, cpu; "
                        r"plaintext, token required, batching up to 256 rows, 5 ms wait\) at 127\.0\.0\.1:\d+$",
                        line.strip()), line
        address = line.split()[-1]
        obs = observations(1)[0]
        assert main(["act", "--address", address, "--obs", json.dumps(obs.tolist()), "--seed", "3",
                     "--token-file", str(token_file)]) == 0
        answer = json.loads(capsys.readouterr().out)
        policy = softflow.load_policy(run_dir)
        torch.manual_seed(3)
        assert answer == {"actions": policy.act(obs.astype(np.float64)).tolist(), "checkpoint_version": version,
                          "candidates": CANDIDATES}
        assert main(["act", "--address", address, "--token-file", str(token_file)]) == 0
        assert json.loads(capsys.readouterr().out)["env_id"] == "InvertedPendulum-v5"
        assert main(["act", "--address", address, "--obs", "[0, 0, 0, 0]"]) == 2
        assert capsys.readouterr().err == (f"softflow: error: {address} answered UNAUTHENTICATED: no token: send the "
                                           f"metadata 'authorization: Bearer <token>'\n")
    finally:
        server.send_signal(signal.SIGTERM)
        _, stderr = server.communicate(timeout=30)
    assert server.returncode == 0 and "Traceback" not in stderr


def test_settle_garbage_collector_freezes_startup_objects_and_still_collects_new_cycles():
    threshold = gc.get_threshold()
    try:
        settle_garbage_collector()
        assert gc.get_freeze_count() > 10_000  # torch, grpc, numpy: everything imported so far
        assert gc.get_threshold() == (GC_YOUNG_THRESHOLD, *threshold[1:])
        cycle = []
        cycle.append(cycle)
        del cycle
        assert gc.collect() >= 1
    finally:
        gc.unfreeze()
        gc.set_threshold(*threshold)


@pytest.fixture
def taken_port():
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        yield str(listener.getsockname()[1])


@pytest.mark.parametrize("args, message", [
    (["serve", "RUN", "--port", "TAKEN"], "cannot listen on 127.0.0.1:TAKEN: Address already in use"),
    (["serve", "no/such/run"], "no checkpoint at no/such/run: give a run directory"),
    (["serve", "RUN", "--host", "0.0.0.0"], "--host 0.0.0.0 is reachable from other machines: give a token "
                                            "(--token-file or $SOFTFLOW_SERVE_TOKEN) and TLS (--tls-cert and "
                                            "--tls-key), or --insecure"),
    (["serve", "RUN", "--tls-cert", "RUN/config.yaml"], "give both --tls-cert and --tls-key, or neither"),
    (["serve", "RUN", "--tls-cert", "RUN/config.yaml", "--tls-key", "RUN/config.yaml"],
     "--tls-cert and --tls-key do not load as a PEM certificate and its private key"),
    (["serve", "RUN", "--token-file", "no/such/token"], "--token-file: must be an existing file (got 'no/such/token'"),
    (["serve", "RUN", "--max-batch-rows", "0"], "--max-batch-rows: must be an integer >= 1 (got '0')"),
    (["serve", "RUN", "--max-request-work", "0"], "--max-request-work: must be an integer >= 1 (got '0')"),
    (["act", "--obs", "[1, 2"], "--obs is not a JSON list of numbers"),
    (["act", "--obs", "[[[1]]]"], "--obs must be one observation [..] or a batch [[..], ..] (got 3 levels)"),
])
def test_command_errors_are_one_line(run_dir, taken_port, args, message, capsys):
    assert main([a.replace("RUN", str(run_dir)).replace("TAKEN", taken_port) for a in args]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"softflow: error: {message.replace('TAKEN', taken_port)}") and err.count("\n") == 1, err
