"""Tests of the cluster files: the Ray launcher YAMLs (cluster/ray/) against Ray's own schema, the KubeRay manifests'
(cluster/kuberay/) required fields, token authentication and exposure of every file under cluster/, and that the
custom resources the experiments name exist in every cluster layout. Pure and fast: no Ray is started, nothing
touches the network. Each check is a function returning its findings, and each has a test feeding it a broken input,
so that the checks are seen to fail."""

from __future__ import annotations

import copy
import functools
import json
import re
import shlex
from pathlib import Path

import jsonschema
import pytest
import ray
import yaml

from softflow.deploy.cli import build_parser
from softflow.deploy.config import ExperimentConfig, load_experiment

ROOT = Path(__file__).resolve().parents[2]
CLUSTER = ROOT / "cluster"
LAUNCHER_FILES = sorted((CLUSTER / "ray").glob("*.yaml"))
KUBERAY_FILES = sorted(p for p in (CLUSTER / "kuberay").glob("*.yaml") if p.name != "networkpolicy.yaml")
EXPERIMENTS = sorted((CLUSTER / "experiments").rglob("*.yaml"))
ALL_CLUSTER_FILES = sorted(p for p in CLUSTER.rglob("*") if p.is_file())
RAY_PORTS = {6379, 8265, 10001}  # GCS, dashboard and job API, Ray client
BUILTIN_RESOURCES = {"CPU", "GPU", "memory", "object_store_memory"}
COMMAND_KEYS = ("initialization_commands", "setup_commands", "head_setup_commands", "worker_setup_commands",
                "head_start_ray_commands", "worker_start_ray_commands")


def _load(path: Path):
    return yaml.safe_load(path.read_text())


def _names(paths):
    return [p.relative_to(ROOT).as_posix() for p in paths]


# ---------------------------------------------------------------- launcher files against Ray's schema


@functools.cache
def _ray_schema() -> dict:
    return json.loads((Path(ray.__file__).parent / "autoscaler" / "ray-schema.json").read_text())


def schema_errors(config) -> list[str]:
    """Ray's launcher schema errors of a config, the check `ray up` starts with (ray-schema.json via jsonschema)."""
    schema = _ray_schema()
    errors = jsonschema.validators.validator_for(schema)(schema).iter_errors(config)
    return [f"{'/'.join(map(str, e.absolute_path)) or '(top level)'}: {e.message}" for e in errors]


def test_the_launcher_files_are_there():
    """Guards the parametrized tests below against an empty glob: the launcher files and manifests exist."""
    assert {p.name for p in LAUNCHER_FILES} >= {"aws.yaml", "gcp.yaml", "local.yaml"}
    assert {p.name for p in KUBERAY_FILES} >= {"raycluster.yaml", "rayjob.yaml"}


@pytest.mark.parametrize("path", LAUNCHER_FILES, ids=_names(LAUNCHER_FILES))
def test_launcher_file_matches_ray_schema(path):
    """Every YAML under cluster/ray/ is a valid cluster-launcher config for the installed Ray (2.60)."""
    assert schema_errors(_load(path)) == []


def test_schema_check_rejects_a_broken_copy():
    """The schema check fails on an unknown top-level key and on a fractional custom resource (must be integers)."""
    config = _load(CLUSTER / "ray" / "aws.yaml")
    assert schema_errors(config) == []
    broken = copy.deepcopy(config)
    broken["worker_nodes"] = {}
    broken["available_node_types"]["rollout"]["resources"]["rollout"] = 1.5
    errors = schema_errors(broken)
    assert any("worker_nodes" in e for e in errors), errors
    assert any(e.startswith("available_node_types/rollout/resources/rollout") for e in errors), errors


@pytest.mark.parametrize("path", LAUNCHER_FILES, ids=_names(LAUNCHER_FILES))
def test_launcher_file_passes_ray_up_preparation(path):
    """`ray up` fills in the provider's defaults (and turns a local file into its single node type) before it
    validates; both steps accept the file. This uses Ray's private helpers, pinned with ray==2.60.0."""
    from ray.autoscaler._private.util import prepare_config, validate_config

    validate_config(prepare_config(_load(path)))


@pytest.mark.parametrize("path", LAUNCHER_FILES + KUBERAY_FILES, ids=_names(LAUNCHER_FILES + KUBERAY_FILES))
def test_envsubst_command_in_the_header_renders_every_placeholder(path):
    """Each file is a template: the `envsubst '${A} ${B}'` its header shows names every ${...} placeholder in the
    file (others, like $RAY_HEAD_IP, belong to the remote shell and must stay unrendered)."""
    text = path.read_text()
    command = re.search(r"envsubst '([^']+)'", text)
    assert command, "the header shows no envsubst command"
    documented = set(re.findall(r"\$\{(\w+)\}", command.group(1)))
    body = "\n".join(line for line in text.splitlines() if not line.lstrip().startswith("#"))
    assert set(re.findall(r"\$\{(\w+)\}", body)) == documented


def _has_gpu(config: dict, node_type: dict) -> bool:
    if node_type.get("resources", {}).get("GPU", 0) >= 1:
        return True
    instance = node_type.get("node_config", {}).get("InstanceType", "")  # AWS reads GPUs off the instance type
    return config["provider"]["type"] == "aws" and re.match(r"(g[3-6]|p[2-5])[a-z]*\.", instance) is not None


@pytest.mark.parametrize("path", LAUNCHER_FILES, ids=_names(LAUNCHER_FILES))
def test_launcher_layout(path):
    """Cloud files: the head node type has a GPU and `learner: 1`; a CPU node type carries `rollout` with
    0 <= min_workers <= max_workers. The local file lists its machines and has no node types (which `ray up` rejects
    for provider `local`)."""
    config = _load(path)
    if config["provider"]["type"] == "local":
        assert config["provider"]["head_ip"] and config["provider"]["worker_ips"]
        assert "available_node_types" not in config and "head_node_type" not in config
        return
    types = config["available_node_types"]
    head = types[config["head_node_type"]]
    assert head["resources"].get("learner") == 1 and _has_gpu(config, head)
    rollout = [t for t in types.values() if t["resources"].get("rollout", 0) >= 1]
    assert rollout, "no node type carries the rollout resource"
    for node_type in rollout:
        assert not _has_gpu(config, node_type)
        assert 0 <= node_type["min_workers"] <= node_type["max_workers"] <= config["max_workers"]


def _commands(config: dict) -> list[str]:
    lists = [config.get(key, []) for key in COMMAND_KEYS]
    for node_type in config.get("available_node_types", {}).values():
        lists += [node_type.get(key, []) for key in COMMAND_KEYS]
    return [command for commands in lists for command in commands]


@pytest.mark.parametrize("path", LAUNCHER_FILES, ids=_names(LAUNCHER_FILES))
def test_launcher_installs_torch_then_softflow_at_a_pinned_revision(path):
    """Setup installs torch (pinned) before softflow, and softflow from git at the SOFTFLOW_REVISION placeholder, so
    that pip neither pulls an unpinned CUDA torch nor installs whatever the default branch holds."""
    commands = _commands(_load(path))
    torch = [i for i, c in enumerate(commands) if "pip install torch==" in c]
    softflow = [i for i, c in enumerate(commands) if re.search(r"softflow @ git\+\S+@\$\{SOFTFLOW_REVISION\}", c)]
    assert torch and softflow and max(torch) < min(softflow), commands


# ---------------------------------------------------------------- token authentication and exposure


def ray_start_problems(commands: list[str]) -> list[str]:
    """Every `ray start` must run with RAY_AUTH_MODE=token set before it in the same command."""
    problems = []
    for command in commands:
        for match in re.finditer(r"\bray start\b", command):
            if "RAY_AUTH_MODE=token" not in command[:match.start()]:
                problems.append(command)
    return problems


@pytest.mark.parametrize("path", LAUNCHER_FILES, ids=_names(LAUNCHER_FILES))
def test_every_ray_start_runs_with_token_auth(path):
    """Head and workers start with RAY_AUTH_MODE=token (Ray only reads the mode from the environment), and the
    token reaches the nodes through file_mounts from ~/.ray/auth_token on the operator's machine, outside the repo."""
    config = _load(path)
    assert any("ray start --head" in c for c in config["head_start_ray_commands"])
    assert any("ray start --address" in c for c in config["worker_start_ray_commands"])
    assert ray_start_problems(_commands(config)) == []
    mounts = {remote: local for remote, local in config["file_mounts"].items() if remote.endswith(".ray/auth_token")}
    assert mounts == {"~/.ray/auth_token": "~/.ray/auth_token"}


def test_ray_start_check_catches_a_start_without_token_auth():
    """The check flags a bare `ray start`, and one whose RAY_AUTH_MODE=token comes after it."""
    assert ray_start_problems(["ulimit -n 65536; RAY_AUTH_MODE=token ray start --head"]) == []
    bad = ["ray start --address=$RAY_HEAD_IP:6379", "ray start --head; RAY_AUTH_MODE=token ray status"]
    assert ray_start_problems(bad) == bad


@pytest.mark.parametrize("path", LAUNCHER_FILES, ids=_names(LAUNCHER_FILES))
def test_launcher_dashboard_stays_on_localhost(path):
    """The head binds the dashboard and job API to 127.0.0.1; users reach it with `ray dashboard` (an SSH tunnel)."""
    hosts = [h for c in _commands(_load(path)) for h in re.findall(r"--dashboard-host[= ](\S+)", c)]
    assert hosts and set(hosts) <= {"127.0.0.1", "localhost"}, hosts


def secret_findings(text: str) -> list[str]:
    """Strings that look like a token: long hex runs (Ray's tokens are 64 hex digits; a 40-digit git SHA and a
    sha256 image digest are allowed), long mixed-case base64 runs, and literal values given to a token/secret key."""
    found = []
    for m in re.finditer(r"(?<![0-9A-Za-z])[0-9a-fA-F]{32,}(?![0-9A-Za-z])", text):
        if len(m.group()) != 40 and not text[:m.start()].endswith("sha256:"):
            found.append(m.group())
    for m in re.finditer(r"(?<![A-Za-z0-9+/=])[A-Za-z0-9+/]{40,}={0,2}", text):
        if all(re.search(c, m.group()) for c in ("[a-z]", "[A-Z]", "[0-9]")):
            found.append(m.group())
    key_value = r"(?i)[\w.-]*(?:token|secret|passw(?:or)?d|api_?key)[\w.-]*['\"]?[ \t]*[:=][ \t]*['\"]?([^\s'\"#,}]+)"
    for m in re.finditer(key_value, text):
        value = m.group(1)
        if len(value) >= 16 and not value.startswith(("$", "~", "/", "{", "<")) and "${" not in value:
            found.append(m.group())
    return found


@pytest.mark.parametrize("path", ALL_CLUSTER_FILES, ids=_names(ALL_CLUSTER_FILES))
def test_no_cluster_file_holds_a_token_or_disables_auth(path):
    """No file under cluster/ commits a token, and none turns token authentication off."""
    text = path.read_text(errors="replace")
    assert secret_findings(text) == []
    assert not re.search(r"RAY_AUTH_MODE['\"]?\s*[=:]\s*['\"]?disabled|name: RAY_AUTH_MODE\s+value: disabled", text)


def test_secret_scan_catches_tokens_and_spares_references():
    """The scan flags a Ray token (64 hex), an openssl base64 secret and a literal RAY_AUTH_TOKEN value; it leaves
    alone the token file path, a Secret's name, a git SHA, an image digest and ${...} placeholders."""
    token = "3f" * 32
    for bad in (f"echo {token} > ~/.ray/auth_token", "value: Zm9vYmFyQmF6UXV4MTIzNDU2Nzg5MGFiY2RlZmdoaWprbG0=",
                "RAY_AUTH_TOKEN=please-do-not-commit-me", "auth_token: 'hunter2hunter2hunter2'"):
        assert secret_findings(bad), bad
    for fine in ("~/.ray/auth_token: ~/.ray/auth_token", "name: softflow-ray-token\nkey: auth_token",
                 "git+https://github.com/o/softflow@" + "a1" * 20, "image@sha256:" + "b2" * 32,
                 "auth_token=$HOME/.ray/auth_token", "RAY_AUTH_TOKEN: ${RAY_AUTH_TOKEN_FROM_CI}"):
        assert secret_findings(fine) == [], fine


def world_open_findings(tree) -> list[str]:
    """Firewall rules that open Ray's ports to the world, anywhere in a YAML tree: AWS IpPermissions with
    0.0.0.0/0 or ::/0 over 6379/8265/10001 (or all ports), GCP firewall rules with such sourceRanges, and a KubeRay
    head exposed outside the cluster (LoadBalancer or NodePort service, Ingress)."""
    found = []
    if isinstance(tree, dict):
        cidrs = [r.get("CidrIp") or r.get("CidrIpv6") for r in tree.get("IpRanges", []) + tree.get("Ipv6Ranges", [])]
        if "FromPort" in tree or "IpProtocol" in tree:
            ports = set(range(tree.get("FromPort", 0), tree.get("ToPort", 65535) + 1))
            if str(tree.get("IpProtocol")) == "-1" or tree.get("FromPort", -1) == -1:
                ports = RAY_PORTS
            if {"0.0.0.0/0", "::/0"} & set(cidrs) and ports & RAY_PORTS:
                found.append(f"AWS rule {tree}")
        if {"0.0.0.0/0", "::/0"} & set(tree.get("sourceRanges", [])):
            allowed = [str(p) for rule in tree.get("allowed", []) for p in rule.get("ports", ["0-65535"])]
            ranges = [(int(p.split("-")[0]), int(p.split("-")[-1])) for p in allowed]
            if any(lo <= port <= hi for lo, hi in ranges for port in RAY_PORTS):
                found.append(f"GCP firewall {tree}")
        if tree.get("serviceType") in ("LoadBalancer", "NodePort") or tree.get("enableIngress") is True:
            found.append(f"exposed head service {tree.get('serviceType') or 'Ingress'}")
        for value in tree.values():
            found += world_open_findings(value)
    elif isinstance(tree, list):
        for value in tree:
            found += world_open_findings(value)
    return found


CLUSTER_YAMLS = sorted(CLUSTER.rglob("*.yaml"))


@pytest.mark.parametrize("path", CLUSTER_YAMLS, ids=_names(CLUSTER_YAMLS))
def test_no_file_opens_ray_ports_to_the_world(path):
    """No YAML under cluster/ opens 6379/8265/10001 to 0.0.0.0/0 or exposes a KubeRay head outside the cluster."""
    assert world_open_findings(_load(path)) == []


def test_port_check_catches_world_open_rules():
    """The check flags 8265 and all-ports rules from 0.0.0.0/0, a GCP rule over 10001 and a LoadBalancer head; SSH
    from anywhere (which `ray up` needs) and the intra-cluster rule are fine."""
    ssh = {"FromPort": 22, "ToPort": 22, "IpProtocol": "tcp", "IpRanges": [{"CidrIp": "0.0.0.0/0"}]}
    internal = {"FromPort": -1, "ToPort": -1, "IpProtocol": "-1", "UserIdGroupPairs": [{"GroupId": "sg-1"}]}
    assert world_open_findings({"security_group": {"IpPermissions": [ssh, internal]}}) == []
    dashboard = {**ssh, "FromPort": 8000, "ToPort": 9000}
    everything = {"IpProtocol": "-1", "IpRanges": [{"CidrIp": "0.0.0.0/0"}]}
    gcp = {"sourceRanges": ["0.0.0.0/0"], "allowed": [{"IPProtocol": "tcp", "ports": ["10000-10010"]}]}
    for bad in (dashboard, everything, gcp, {"headGroupSpec": {"serviceType": "LoadBalancer"}}):
        assert world_open_findings({"x": [bad]}), bad


# ---------------------------------------------------------------- KubeRay manifests


def _cluster_spec(doc: dict) -> dict:
    return doc["spec"]["rayClusterSpec"] if doc.get("kind") == "RayJob" else doc["spec"]


def _groups(doc: dict) -> list[tuple[str, dict]]:
    spec = _cluster_spec(doc)
    return [("head", spec["headGroupSpec"])] + [(g.get("groupName", "?"), g) for g in spec["workerGroupSpecs"]]


def manifest_problems(doc: dict) -> list[str]:
    """Missing or malformed fields a KubeRay operator needs (rayStartParams values must be strings)."""
    problems = []
    if doc.get("apiVersion") != "ray.io/v1":
        problems.append(f"apiVersion {doc.get('apiVersion')!r}")
    if doc.get("kind") not in ("RayCluster", "RayJob"):
        return problems + [f"kind {doc.get('kind')!r}"]
    if not doc.get("metadata", {}).get("name"):
        problems.append("metadata.name")
    if doc["kind"] == "RayJob" and not doc["spec"].get("entrypoint"):
        problems.append("spec.entrypoint")
    spec = _cluster_spec(doc)
    if not spec.get("workerGroupSpecs"):
        problems.append("workerGroupSpecs")
    for name, group in [("head", spec.get("headGroupSpec", {}))] + [(g.get("groupName"), g) for g in
                                                                      spec.get("workerGroupSpecs", [])]:
        params = group.get("rayStartParams")
        if not isinstance(params, dict) or not all(isinstance(v, str) for v in params.values()):
            problems.append(f"{name}: rayStartParams must map names to strings")
        containers = group.get("template", {}).get("spec", {}).get("containers") or []
        if not containers or not all(c.get("name") and c.get("image") for c in containers):
            problems.append(f"{name}: template.spec.containers with name and image")
        if name != "head":
            counts = [group.get(k) for k in ("minReplicas", "replicas", "maxReplicas")]
            if not name or not all(isinstance(c, int) for c in counts) or sorted(counts) != counts:
                problems.append(f"{name}: groupName and minReplicas <= replicas <= maxReplicas")
    return problems


@pytest.mark.parametrize("path", KUBERAY_FILES, ids=_names(KUBERAY_FILES))
def test_kuberay_manifest_fields(path):
    """Each manifest is a ray.io/v1 RayCluster or RayJob with the fields the operator requires."""
    assert manifest_problems(_load(path)) == []


def test_manifest_check_catches_missing_fields():
    """The check flags a group without groupName, an integer rayStartParams value and a head without containers."""
    doc = _load(CLUSTER / "kuberay" / "raycluster.yaml")
    del doc["spec"]["workerGroupSpecs"][0]["groupName"]
    doc["spec"]["workerGroupSpecs"][1]["rayStartParams"]["num-cpus"] = 8
    doc["spec"]["headGroupSpec"]["template"]["spec"]["containers"] = []
    assert len(manifest_problems(doc)) == 3, manifest_problems(doc)


@pytest.mark.parametrize("path", KUBERAY_FILES, ids=_names(KUBERAY_FILES))
def test_learner_group_requests_a_gpu(path):
    """The learner group asks Kubernetes for an NVIDIA GPU in every container limit; the rollout group for none."""
    groups = dict(_groups(_load(path)))
    for name, wants_gpu in (("learner", True), ("rollout", False)):
        for container in groups[name]["template"]["spec"]["containers"]:
            gpus = container.get("resources", {}).get("limits", {}).get("nvidia.com/gpu", 0)
            assert (gpus >= 1) == wants_gpu, (name, container.get("resources"))


def auth_problems(doc: dict) -> list[str]:
    """Every Ray container (and the autoscaler, if on) runs with RAY_AUTH_MODE=token, and the token comes from a
    Kubernetes Secret: KubeRay's own (`authOptions: {mode: token}`) or one named in a secretKeyRef, never a value."""
    spec = _cluster_spec(doc)
    operator_secret = spec.get("authOptions", {}).get("mode") == "token"
    envs = [(f"{name}/{c.get('name')}", c.get("env") or []) for name, group in _groups(doc)
            for c in group["template"]["spec"]["containers"]]
    if spec.get("enableInTreeAutoscaling"):
        envs.append(("autoscaler", spec.get("autoscalerOptions", {}).get("env") or []))
    problems = []
    for where, env in envs:
        variables = {e["name"]: e for e in env}
        if variables.get("RAY_AUTH_MODE", {}).get("value") != "token":
            problems.append(f"{where}: RAY_AUTH_MODE is not token")
        token = variables.get("RAY_AUTH_TOKEN")
        if token is None and not operator_secret:
            problems.append(f"{where}: no token (RAY_AUTH_TOKEN from a Secret, or spec authOptions mode token)")
        if token is not None and not ("value" not in token and token.get("valueFrom", {}).get("secretKeyRef", {})
                                      .get("name")):
            problems.append(f"{where}: RAY_AUTH_TOKEN must come from a secretKeyRef, not a value")
    return problems


@pytest.mark.parametrize("path", KUBERAY_FILES, ids=_names(KUBERAY_FILES))
def test_kuberay_token_auth_in_every_container(path):
    """Token auth is on in every Ray container of every group; the token comes from a Secret referenced by name."""
    assert auth_problems(_load(path)) == []


def test_auth_check_catches_a_container_without_auth_and_a_literal_token():
    """The check flags a worker container that lost RAY_AUTH_MODE and a token written into the manifest."""
    doc = _load(CLUSTER / "kuberay" / "raycluster.yaml")
    rollout = doc["spec"]["workerGroupSpecs"][1]["template"]["spec"]["containers"][0]
    rollout["env"] = [e for e in rollout["env"] if e["name"] != "RAY_AUTH_MODE"]
    doc["spec"]["autoscalerOptions"]["env"] = [{"name": "RAY_AUTH_MODE", "value": "token"},
                                               {"name": "RAY_AUTH_TOKEN", "value": "not-a-secret"}]
    problems = auth_problems(doc)
    assert any(p.startswith("rollout/") for p in problems) and any(p.startswith("autoscaler") for p in problems)


# ---------------------------------------------------------------- custom resources: experiments vs. cluster layouts


def _resource_names(resources_json: str) -> set[str]:
    """The names in a `--resources` JSON after shell unquoting (values may be shell, e.g. `$(nproc)`)."""
    return set(re.findall(r'"([^"]+)"\s*:', resources_json))


def provided_resources(path: Path) -> set[str]:
    """The custom resources some node type or worker group of a layout file offers."""
    doc = _load(path)
    if path.parent.name == "kuberay":
        # KubeRay passes the value to `ray start --resources=VALUE` through a shell: '"{\\"a\\": 1}"' in YAML.
        values = [" ".join(shlex.split(g["rayStartParams"].get("resources", "{}"))) for _, g in _groups(doc)]
        return {n for value in values for n in _resource_names(value)}
    if "available_node_types" in doc:
        return {n for t in doc["available_node_types"].values() for n in t.get("resources", {})} - BUILTIN_RESOURCES
    arguments = [a for c in _commands(doc) for a in shlex.split(c.replace(";", " ; "))]
    return {n for a in arguments if a.startswith("--resources=") for n in _resource_names(a.split("=", 1)[1])}


def required_resources(config: ExperimentConfig) -> set[str]:
    return set(config.actors.resources) | set(config.learner.resources)


LAYOUTS = LAUNCHER_FILES + KUBERAY_FILES


@pytest.mark.parametrize("experiment", EXPERIMENTS, ids=_names(EXPERIMENTS))
def test_experiment_resources_exist_in_every_layout(experiment):
    """Every custom resource an experiment names (actors.resources, learner.resources) is offered by some node type
    of each launcher file and some group of each KubeRay manifest, so the run can be placed on any of them."""
    needed = required_resources(load_experiment(experiment))
    missing = {p.name: sorted(needed - provided_resources(p)) for p in LAYOUTS}
    assert all(not m for m in missing.values()), missing


@pytest.mark.parametrize("path", LAYOUTS, ids=_names(LAYOUTS))
def test_resource_check_finds_learner_and_rollout_and_reports_tpu(path):
    """An experiment naming {learner: 1} and {rollout: 1} fits every layout; one naming {tpu: 1} is reported."""
    experiment = CLUSTER / "experiments" / "inverted-pendulum.yaml"
    fits = load_experiment(experiment, ["learner.resources={learner: 1}", "actors.resources={rollout: 1}"])
    assert required_resources(fits) == {"learner", "rollout"}
    assert required_resources(fits) - provided_resources(path) == set()
    tpu = load_experiment(experiment, ["learner.resources={tpu: 1}"])
    assert required_resources(tpu) - provided_resources(path) == {"tpu"}


def test_rayjob_entrypoint_is_a_softflow_train_that_fits_its_cluster():
    """The RayJob's entrypoint parses as `softflow train`, its experiment and overrides load, and the resources they
    name exist in the job's own cluster spec."""
    path = CLUSTER / "kuberay" / "rayjob.yaml"
    argv = shlex.split(_load(path)["spec"]["entrypoint"])
    assert argv[:2] == ["softflow", "train"]
    args = build_parser().parse_args(argv[1:])
    config = load_experiment(ROOT / args.experiment, args.overrides)
    assert required_resources(config) == {"learner", "rollout"}
    assert required_resources(config) <= provided_resources(path)
