"""The policy server's security model, against a real gRPC server: off loopback it needs a token and TLS or
``--insecure`` (refused with one line before anything is served), tokens come from a file or the environment and
are compared in constant time, work per request and per batch is capped, inference runs off the event loop so that
health and Info answer within 100 ms while the policy is saturated, NaN or inf actions are never sent, and Info names
no path."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time

import grpc
import numpy as np
import pytest
from helpers import OBS_DIM, train_tiny_run
from test_serve_hostile import self_signed_certificate

from softflow.deploy import PolicyClient
from softflow.deploy.cli import build_parser, main
from softflow.deploy.serve import security
from softflow.deploy.serve import server as server_module
from softflow.deploy.serve.proto import ACT_METHOD, TOKEN_ENV, ActRequest, to_tensor
from softflow.deploy.serve.server import PolicyServer, ServeOptions, options_from_args

pytestmark = [pytest.mark.grpc, pytest.mark.usefixtures("one_torch_thread")]

TOKEN = os.urandom(16).hex()
EXHAUSTED = grpc.StatusCode.RESOURCE_EXHAUSTED


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    return train_tiny_run(tmp_path_factory.mktemp("security-run"))


@pytest.fixture(scope="module")
def tls_files(tmp_path_factory):
    """(certificate file, key file) of a self-signed certificate for localhost and 127.0.0.1."""
    folder = tmp_path_factory.mktemp("tls")
    cert, key = self_signed_certificate()
    (folder / "cert.pem").write_bytes(cert)
    (folder / "key.pem").write_bytes(key)
    return folder / "cert.pem", folder / "key.pem"


@pytest.fixture(scope="module")
def server(run_dir):
    options = ServeOptions(port=0, reload_interval_s=0, max_request_work=64, max_batch_work=8)
    with PolicyServer(run_dir, options) as server:
        yield server


def act_request(rows: int, candidates: int = 0, value: float = 0.0) -> bytes:
    obs = np.full((rows, OBS_DIM), value, np.float32)
    return ActRequest(observations=to_tensor(obs), candidates=candidates).SerializeToString()


def call(address: str, raw: bytes, metadata=()) -> tuple[grpc.StatusCode, str]:
    with grpc.insecure_channel(address) as plaintext:
        try:
            plaintext.unary_unary(ACT_METHOD)(raw, timeout=30, metadata=metadata)
        except grpc.RpcError as exc:
            return exc.code(), exc.details()
    return grpc.StatusCode.OK, ""


@pytest.mark.parametrize("flags, missing", [
    ([], "a token (--token-file or $SOFTFLOW_SERVE_TOKEN) and TLS (--tls-cert and --tls-key)"),
    (["--token-file", "TOKEN"], "TLS (--tls-cert and --tls-key)"),
    (["--tls-cert", "CERT", "--tls-key", "KEY"], "a token (--token-file or $SOFTFLOW_SERVE_TOKEN)"),
])
def test_off_loopback_without_token_and_tls_is_refused_before_serving(run_dir, tls_files, tmp_path, monkeypatch,
                                                                      capsys, flags, missing):
    (tmp_path / "token").write_text(TOKEN)
    monkeypatch.delenv(TOKEN_ENV, raising=False)

    def must_not_run(*args, **kwargs):
        raise AssertionError("the server got as far as loading or serving")

    monkeypatch.setattr(server_module, "load_served", must_not_run)
    monkeypatch.setattr(PolicyServer, "start", must_not_run)
    paths = {"TOKEN": str(tmp_path / "token"), "CERT": str(tls_files[0]), "KEY": str(tls_files[1])}
    argv = ["serve", str(run_dir), "--host", "0.0.0.0", "--port", "0", *[paths.get(f, f) for f in flags]]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err == (f"softflow: error: --host 0.0.0.0 is reachable from other machines: give {missing}, or --insecure "
                   f"to serve unauthenticated, unencrypted inference to the network\n")


def test_the_token_comes_from_a_file_or_the_environment_never_a_flag_value(run_dir, tls_files, monkeypatch, capsys):
    assert main(["serve", str(run_dir), "--token", TOKEN]) == 2
    assert capsys.readouterr().err.startswith("softflow: error: unrecognized arguments: --token")
    argv = ["serve", str(run_dir), "--host", "0.0.0.0", "--tls-cert", str(tls_files[0]), "--tls-key",
            str(tls_files[1])]
    monkeypatch.setenv(TOKEN_ENV, f" {TOKEN}\n")
    options = options_from_args(build_parser().parse_args(argv))
    options.check()  # token from the environment and TLS: accepted off loopback
    assert options.token == TOKEN and options.insecure_warning("0.0.0.0:1") is None
    monkeypatch.setenv(TOKEN_ENV, " ")
    assert main(argv) == 2
    assert capsys.readouterr().err == f"softflow: error: ${TOKEN_ENV} is set but empty; unset it or give it the token\n"


def test_insecure_off_loopback_starts_and_warns_what_it_exposes(run_dir):
    env = {k: v for k, v in os.environ.items() if k != TOKEN_ENV} | {"OMP_NUM_THREADS": "1"}
    process = subprocess.Popen([sys.executable, "-m", "softflow.deploy.cli", "serve", str(run_dir), "--host",
                                "0.0.0.0", "--port", "0", "--insecure", "--reload-interval", "0"],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        line = process.stdout.readline()
        assert "plaintext, no token" in line and " at 0.0.0.0:" in line, line
        port = line.split(":")[-1].strip()
        with PolicyClient(f"127.0.0.1:{port}") as client:
            assert client.act(np.zeros(OBS_DIM), deterministic=True).shape == (1,)
    finally:
        process.send_signal(signal.SIGTERM)
        _, stderr = process.communicate(timeout=30)
    warnings = [line for line in stderr.splitlines() if "--insecure" in line]
    assert len(warnings) == 1, stderr
    assert warnings[0].endswith(f"WARNING --insecure: unauthenticated and unencrypted inference is open to the network "
                                f"at 0.0.0.0:{port}: anyone who reaches it can query the policy and read "
                                f"observations and actions in transit"), warnings
    assert process.returncode == 0 and "Traceback" not in stderr


def test_a_wrong_token_is_rejected_and_the_right_one_accepted_over_tls(run_dir, tls_files, monkeypatch):
    compared = []
    compare = security.hmac.compare_digest
    monkeypatch.setattr(security.hmac, "compare_digest", lambda a, b: compared.append(1) or compare(a, b))
    cert, key = (path.read_bytes() for path in tls_files)
    options = ServeOptions(port=0, reload_interval_s=0, token=TOKEN, tls_cert=cert, tls_key=key)
    obs = np.zeros((2, OBS_DIM), np.float32)
    with PolicyServer(run_dir, options) as server:
        for wrong in (None, TOKEN[:-1] + ("0" if TOKEN[-1] != "0" else "1"), TOKEN.upper() + "x"):
            with PolicyClient(server.address, token=wrong, tls_cert=tls_files[0]) as client:
                with pytest.raises(grpc.RpcError) as refused:
                    client.act(obs)
                assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
                assert client.health() == "SERVING"
        with PolicyClient(server.address, token=TOKEN, tls_cert=tls_files[0]) as client:
            assert client.act(obs, deterministic=True).shape == (2, 1)
            assert client.info()["env_id"] == "InvertedPendulum-v5"
    assert len(compared) >= 4  # every call with a token was checked by hmac.compare_digest


def test_work_over_the_request_limit_is_refused_and_never_runs(server):
    calls = server.batcher.policy_calls
    code, details = call(server.address, act_request(16, candidates=8))  # 16 rows and 8 candidates: each allowed
    assert code == EXHAUSTED and details == ("16 rows x 8 candidates = 128 is over this server's limit of 64 per "
                                             "request; send fewer rows or candidates"), details
    assert server.batcher.policy_calls == calls
    assert call(server.address, act_request(8, candidates=8)) == (grpc.StatusCode.OK, "")
    assert server.batcher.policy_calls == calls + 1


def test_a_batch_holds_no_more_than_the_batch_work_limit(server):
    """Concurrent requests of 1 row x 4 candidates, with a batch limit of 8: at most two per policy call."""
    calls = server.batcher.policy_calls
    barrier = threading.Barrier(12)
    results = []

    def ask():
        barrier.wait()
        results.append(call(server.address, act_request(1, candidates=4)))

    threads = [threading.Thread(target=ask) for _ in range(12)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert results == [(grpc.StatusCode.OK, "")] * 12
    assert server.batcher.policy_calls - calls >= 6


def test_health_and_info_answer_within_100_ms_while_inference_is_saturated(run_dir):
    heavy = act_request(1024, candidates=128)  # about a tenth of a second of policy work each, on one thread
    options = ServeOptions(port=0, reload_interval_s=0, max_request_work=1024 * 128, max_batch_work=1024 * 128)
    stop = threading.Event()
    answered = []
    with PolicyServer(run_dir, options) as server, PolicyClient(server.address) as probe:
        probe.health()
        probe.info()

        def keep_asking() -> None:
            with grpc.insecure_channel(server.address) as channel:
                act = channel.unary_unary(ACT_METHOD)
                while not stop.is_set():
                    act(heavy, timeout=60)
                    answered.append(1)

        askers = [threading.Thread(target=keep_asking) for _ in range(6)]
        for asker in askers:
            asker.start()
        try:
            deadline = time.monotonic() + 30
            while server.batcher.policy_calls < 3 and time.monotonic() < deadline:
                time.sleep(0.01)
            latencies = []
            for i in range(30):
                start = time.perf_counter()
                probe.health() if i % 2 else probe.info()
                latencies.append(time.perf_counter() - start)
                time.sleep(0.02)
            calls_during = server.batcher.policy_calls
        finally:
            stop.set()
            for asker in askers:
                asker.join(timeout=60)
    assert calls_during >= 3 and len(answered) >= 3
    assert max(latencies) < 0.1, f"health/Info took up to {max(latencies) * 1e3:.0f} ms under load " \
                                 f"(median {np.median(latencies) * 1e3:.1f} ms)"


def test_nan_or_inf_actions_are_an_error_never_an_answer(server, monkeypatch):
    """A policy that turns rows whose first value is 1 into NaN (and 2 into inf): those callers get INTERNAL, the
    others in the same batch their actions."""
    algorithm = server.served.policy.algorithm

    def broken_act(obs, explore, candidates):
        first = np.asarray(obs)[:, :1]
        return np.where(first == 1, np.nan, np.where(first == 2, np.inf, 0.25)).astype(np.float32)

    monkeypatch.setattr(algorithm, "act", broken_act)
    for value, bad in ((1.0, "NaN"), (2.0, "inf")):
        code, details = call(server.address, act_request(3, candidates=1, value=value))
        assert code == grpc.StatusCode.INTERNAL, (bad, code, details)
        assert details.startswith("the policy produced NaN or inf actions for 3 of 3 rows (checkpoint version ")
        assert details.endswith("none were sent")
    with PolicyClient(server.address) as client:
        np.testing.assert_array_equal(client.act(np.zeros((2, OBS_DIM)), deterministic=True), [[0.25], [0.25]])
        assert client.health() == "SERVING"
    monkeypatch.undo()
    with PolicyClient(server.address) as client:
        assert np.isfinite(client.act(np.ones((2, OBS_DIM)), deterministic=True)).all()


def test_info_names_no_path(server, run_dir):
    with PolicyClient(server.address) as client:
        info = client.info()
    text = json.dumps(info)
    assert "checkpoint_path" not in info and "/" not in text and run_dir.name not in text, text
    assert (info["max_request_work"], info["max_batch_work"]) == (64, 8)
    assert info["checkpoint_version"] > 0 and info["algorithm"] == "isfm"
