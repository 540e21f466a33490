"""The committed stubs in deploy/serve/proto/ are what the command at the head of policy_service.proto generates from it
today (grpcio-tools is pinned in the test extras, so the output is reproducible)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PROTO = ROOT / "deploy" / "serve" / "proto" / "policy_service.proto"
STUBS = ["policy_service_pb2.py", "policy_service_pb2.pyi", "policy_service_pb2_grpc.py"]


def test_committed_stubs_match_the_proto(tmp_path):
    command = re.search(r"python -m grpc_tools\.protoc (.*?) deploy/serve/proto/policy_service\.proto",
                        PROTO.read_text().replace("\\\n//", ""), re.S)
    assert command, "the regenerate command is missing from the head of policy_service.proto"
    args = command.group(1).replace("build/proto", str(tmp_path)).split()
    subprocess.run([sys.executable, "-m", "grpc_tools.protoc", *args, "deploy/serve/proto/policy_service.proto"],
                   cwd=ROOT, check=True, capture_output=True, text=True)
    for name in STUBS:
        generated = (tmp_path / "softflow" / "deploy" / "serve" / "proto" / name).read_text()
        if generated != (ROOT / "deploy" / "serve" / "proto" / name).read_text():
            pytest.fail(f"deploy/serve/proto/{name} is stale: regenerate the stubs with the command in {PROTO.name}")
