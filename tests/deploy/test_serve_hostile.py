"""Hostile input to a real policy server on loopback: every fault gets its gRPC status and a one-line message,
and the server keeps answering good requests (checked after each). Also: bearer tokens, TLS with a certificate
made by the test, clients that go away mid-call, a flood beyond the concurrency limit, and 300 fuzzed requests
(``softflow bench serve`` sends 10,000)."""

from __future__ import annotations

import datetime
import ipaddress
import os
import socket
import subprocess
import sys
import time

import grpc
import numpy as np
import pytest
import torch
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from helpers import OBS_DIM, train_tiny_run

import softflow
from softflow.deploy import PolicyClient
from softflow.deploy.bench.serve import fuzz_request
from softflow.deploy.serve.proto import ACT_METHOD, ActRequest, Tensor, bearer, to_tensor
from softflow.deploy.serve.server import PolicyServer, ServeOptions

pytestmark = [pytest.mark.grpc, pytest.mark.usefixtures("one_torch_thread")]

TOKEN = os.urandom(16).hex()
LIMITS = dict(max_request_rows=16, max_candidates=8, max_message_bytes=64 * 1024)
INVALID, EXHAUSTED = grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.RESOURCE_EXHAUSTED


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    return train_tiny_run(tmp_path_factory.mktemp("hostile-run"))


@pytest.fixture(scope="module")
def server(run_dir):
    with PolicyServer(run_dir, ServeOptions(port=0, reload_interval_s=0, token=TOKEN, **LIMITS)) as server:
        yield server


@pytest.fixture(scope="module")
def raw_act(server):
    """Sends request bytes as they are, with the token; returns the status code and details."""
    channel = grpc.insecure_channel(server.address, options=[("grpc.max_send_message_length", 1 << 26)])
    act = channel.unary_unary(ACT_METHOD)

    with_token = bearer(TOKEN)

    def send(raw: bytes, metadata=with_token) -> tuple[grpc.StatusCode, str]:
        try:
            act(raw, timeout=30, metadata=metadata)
        except grpc.RpcError as exc:
            return exc.code(), exc.details()
        return grpc.StatusCode.OK, ""

    yield send
    channel.close()


def still_answers(server) -> None:
    obs = np.zeros((2, OBS_DIM), np.float32)
    with PolicyClient(server.address, token=TOKEN) as client:
        assert client.act(obs, deterministic=True).shape == (2, 1)


def request(obs=None, dtype=None, shape=None, data=None, **fields) -> bytes:
    """A serialised ActRequest for ``obs`` (default: two rows of zeros), with its tensor's fields overridden."""
    tensor = to_tensor(np.zeros((2, OBS_DIM), np.float32) if obs is None else obs)
    tensor = Tensor(dtype=dtype or tensor.dtype, shape=tensor.shape if shape is None else shape,
                    data=tensor.data if data is None else data)
    return ActRequest(observations=tensor, **fields).SerializeToString()


NAN_ROW = np.zeros((3, OBS_DIM), np.float32)
NAN_ROW[2, 1] = np.nan


@pytest.mark.parametrize("raw, code, message", [
    (request(np.zeros((2, OBS_DIM + 1), np.float32)), INVALID,
     "observations have 5 values per row but this policy (InvertedPendulum-v5) takes 4"),
    (request(np.zeros(OBS_DIM, np.float32)), INVALID, "observations must have shape (rows, 4); got [4]"),
    (request(shape=[2, 2, 2]), INVALID, "observations must have shape (rows, 4); got [2, 2, 2]"),
    (request(dtype="int64"), INVALID, "observations: dtype 'int64' is not supported; send one of float32, float64"),
    (request(data=b"\x00" * 12), INVALID, "observations: shape [2, 4] of float32 needs 32 bytes of data but 12"),
    (request(shape=[-1, OBS_DIM]), INVALID, "observations: shape [-1, 4] has a negative dimension"),
    (request(NAN_ROW), INVALID, "observation row 2 has NaN or inf values"),
    (request(np.full((1, OBS_DIM), -np.inf, np.float32)), INVALID, "observation row 0 has NaN or inf values"),
    (request(np.full((1, OBS_DIM), 1e300)), INVALID, "observation row 0 has NaN or inf values (or float64 values "
                                                     "beyond float32's range)"),
    (request(np.zeros((0, OBS_DIM), np.float32)), INVALID, "empty batch: send at least one observation row"),
    (request(np.zeros((17, OBS_DIM), np.float32)), EXHAUSTED,
     "17 observation rows is over this server's limit of 16 per request; split the batch"),
    (request(shape=[1 << 62, OBS_DIM]), EXHAUSTED, f"{1 << 62} observation rows is over this server's limit"),
    (request(candidates=9), EXHAUSTED, "9 candidates is over this server's limit of 8"),
    (request(candidates=3, deterministic=True), INVALID, "deterministic asks for the zero-noise action, one "
                                                         "candidate; leave candidates at 0 or 1 (got 3)"),
    (b"", INVALID, "the request has no observations"),
    (b"\xff\xfe\x00garbage", INVALID, "the request is not a valid softflow.v1.ActRequest"),
    (request(np.zeros((16, 1100), np.float32)), EXHAUSTED,
     "SERVER: Received message larger than max (70422 vs. 65536)"),
], ids=["width", "rank-1", "rank-3", "dtype", "data-size", "negative-dim", "nan", "inf", "float64-overflow",
        "empty-batch", "rows-over-limit", "rows-huge", "candidates-over-limit", "deterministic-candidates",
        "no-observations", "random-bytes", "message-over-size"])
def test_bad_requests_get_their_status_and_one_line(server, raw_act, raw, code, message):
    got_code, details = raw_act(raw)
    assert got_code == code and message in details and "\n" not in details, (got_code, details)
    still_answers(server)


def test_missing_or_wrong_token_is_unauthenticated_and_health_needs_none(server, raw_act):
    assert raw_act(request(), metadata=()) == (
        grpc.StatusCode.UNAUTHENTICATED, "no token: send the metadata 'authorization: Bearer <token>'")
    for wrong in (TOKEN[:-1], TOKEN + "0", "", "x" * 4000):
        assert raw_act(request(), metadata=bearer(wrong)) == (
            grpc.StatusCode.UNAUTHENTICATED, "wrong token in the 'authorization' metadata")
    code, details = raw_act(request(), metadata=bearer("x" * 32_000))  # over gRPC's metadata size limit
    assert code == EXHAUSTED and "metadata size exceeds" in details, (code, details)
    with PolicyClient(server.address) as client:
        with pytest.raises(grpc.RpcError) as info:
            client.info()
        assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
        assert client.health() == "SERVING"
    still_answers(server)


def self_signed_certificate() -> tuple[bytes, bytes]:
    """(certificate PEM, private key PEM) for localhost and 127.0.0.1, made now, valid for a day."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.datetime.now(datetime.UTC)
    certificate = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
                   .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=5))
                   .not_valid_after(now + datetime.timedelta(days=1))
                   .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost"),
                                                               x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                                  critical=False)
                   .sign(key, hashes.SHA256()))
    key_pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())
    return certificate.public_bytes(serialization.Encoding.PEM), key_pem


def test_tls_with_a_token_answers_like_load_policy(run_dir, tmp_path):
    cert, key = self_signed_certificate()
    (tmp_path / "server.pem").write_bytes(cert)
    options = ServeOptions(port=0, reload_interval_s=0, token=TOKEN, tls_cert=cert, tls_key=key)
    obs = np.random.default_rng(1).normal(0, 0.1, (3, OBS_DIM)).astype(np.float32)
    policy = softflow.load_policy(run_dir)
    torch.manual_seed(9)
    expected = policy.act(obs)
    with PolicyServer(run_dir, options) as server:
        with PolicyClient(server.address, token=TOKEN, tls_cert=tmp_path / "server.pem") as client:
            np.testing.assert_array_equal(client.act(obs, seed=9), expected)
        with PolicyClient(server.address, token=TOKEN, timeout=3) as plaintext:
            with pytest.raises(grpc.RpcError) as info:
                plaintext.act(obs)
            assert info.value.code() == grpc.StatusCode.UNAVAILABLE


CLIENT_SCRIPT = """
import sys, time, grpc
raw = sys.stdin.buffer.read()
act = grpc.insecure_channel(sys.argv[1]).unary_unary(sys.argv[2])
calls = [act.future(raw) for _ in range(8)]
print("sent", flush=True)
time.sleep(120)
"""


def test_clients_that_go_away_mid_call_leave_the_server_answering(run_dir):
    heavy = request(np.zeros((1024, OBS_DIM), np.float32), candidates=256)  # a quarter of a second each here
    options = ServeOptions(port=0, reload_interval_s=0, max_request_work=1024 * 256)
    with PolicyServer(run_dir, options) as server:
        batcher = server.batcher
        # a client process killed while its 8 calls are queued and the first is being computed
        client = subprocess.Popen([sys.executable, "-c", CLIENT_SCRIPT, server.address, ACT_METHOD],
                                  stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        client.stdin.write(heavy)
        client.stdin.close()
        assert client.stdout.readline() == b"sent\n"
        deadline = time.monotonic() + 30
        while batcher.policy_calls == 0 and time.monotonic() < deadline:
            time.sleep(0.01)
        client.kill()
        client.wait()
        # calls cancelled by the client, their channel closed under them, or past their deadline
        channel = grpc.insecure_channel(server.address)
        act = channel.unary_unary(ACT_METHOD)
        calls = [act.future(heavy) for _ in range(4)]
        time.sleep(0.05)
        calls[0].cancel()
        channel.close()
        with pytest.raises(grpc.RpcError) as info:
            grpc.insecure_channel(server.address).unary_unary(ACT_METHOD)(heavy, timeout=0.01)
        assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        with socket.create_connection(("127.0.0.1", server.port)) as sock:  # half an HTTP/2 preface
            sock.sendall(b"PRI * HTTP/2.0\r\n")
        start = time.monotonic()
        with PolicyClient(server.address) as good:
            assert good.act(np.zeros(OBS_DIM), deterministic=True).shape == (1,)
        # of the 14 calls, the first of the killed client's and the good one are answered; the others' callers were
        # gone before their turn (at most one of each group was being computed when its caller went)
        assert batcher.queries_served <= 4, f"{batcher.queries_served} answered: the server kept working for " \
                                            f"callers that had gone"
        assert time.monotonic() - start < 3.0


def test_a_flood_beyond_the_concurrency_limit_is_resource_exhausted(run_dir):
    options = ServeOptions(port=0, reload_interval_s=0, max_concurrent_rpcs=4)
    calls_of_one_row = request(np.zeros((1, OBS_DIM), np.float32), candidates=64)  # a batch holds them all
    with PolicyServer(run_dir, options) as server, grpc.insecure_channel(server.address) as channel:
        act = channel.unary_unary(ACT_METHOD)
        calls = [act.future(calls_of_one_row, timeout=60) for _ in range(64)]
        codes = [call.exception().code() if call.exception() else grpc.StatusCode.OK for call in calls]
        exhausted = [call.exception().details() for call in calls if call.exception()]
        assert set(codes) == {grpc.StatusCode.OK, EXHAUSTED}, codes
        assert exhausted[0] == "4 Act calls in progress is this server's limit (--max-concurrent-rpcs); retry later"
        with PolicyClient(server.address) as client:
            assert client.act(np.zeros(OBS_DIM), deterministic=True).shape == (1,)


def test_smoke_300_fuzzed_requests_get_only_expected_statuses(server, raw_act):
    rng = np.random.default_rng(0)
    statuses = {}
    start = time.monotonic()
    for _ in range(300):
        code, details = raw_act(fuzz_request(rng, OBS_DIM, LIMITS["max_message_bytes"]))
        statuses[code.name] = statuses.get(code.name, 0) + 1
        assert code in (grpc.StatusCode.OK, INVALID, EXHAUSTED) and "\n" not in details, (code, details)
    assert statuses["OK"] > 0 and statuses["INVALID_ARGUMENT"] > 0 and time.monotonic() - start < 60
    still_answers(server)
