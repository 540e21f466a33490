"""Security of the KubeRay manifests (cluster/kuberay/): the NetworkPolicy admits Ray's dashboard, job API and client
ports only from labelled submitters (and the operator), every pod runs as non-root without privilege escalation or
capabilities, the W&B key comes from a Secret, token authentication stays on, and no README or doc suggests putting
a key into a job's runtime_env. Pure and fast, like test_cluster_files.py, whose loaders it shares; each check has
a test feeding it a broken input."""

from __future__ import annotations

import copy
import re

import pytest
from test_cluster_files import CLUSTER, KUBERAY_FILES, ROOT, _cluster_spec, _groups, _load, _names, auth_problems

NETWORK_POLICY = CLUSTER / "kuberay" / "networkpolicy.yaml"
SUBMITTER = {"softflow.io/ray-submitter": "true"}
OPERATOR = {"app.kubernetes.io/name": "kuberay-operator"}
SOFTFLOW = {"app.kubernetes.io/name": "softflow"}
RAY_API_PORTS = {8265, 10001}  # dashboard and job API, Ray client
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]


def _policies(doc: dict) -> list[dict]:
    return doc["items"] if doc.get("kind") == "List" else [doc]


def network_problems(doc: dict) -> list[str]:
    """Ingress that reaches softflow pods from anywhere but softflow pods of the namespace, or Ray's API ports from
    anywhere but pods and namespaces labelled softflow.io/ray-submitter=true (or the operator, on 8265)."""
    problems = []
    policies = [p for p in _policies(doc) if p.get("kind") == "NetworkPolicy"]
    if not policies:
        return ["no NetworkPolicy"]
    selected = set()
    for policy in policies:
        name, spec = policy["metadata"]["name"], policy["spec"]
        selector = spec.get("podSelector", {}).get("matchLabels", {})
        if selector.items() < SOFTFLOW.items() or "Ingress" not in spec.get("policyTypes", []):
            problems.append(f"{name}: must select app.kubernetes.io/name=softflow pods for Ingress")
        selected.add(selector.get("ray.io/node-type", "all"))
        for rule in spec.get("ingress", []):
            ports = {p.get("port") for p in rule.get("ports", [])} or {"all"}
            if not rule.get("from"):
                problems.append(f"{name}: a rule open to every source on ports {sorted(map(str, ports))}")
            for peer in rule.get("from", []):
                pods = peer.get("podSelector", {}).get("matchLabels")
                namespaces = peer.get("namespaceSelector", {}).get("matchLabels")
                if "ipBlock" in peer or pods is None:
                    problems.append(f"{name}: a peer without a pod selector: {peer}")
                elif "namespaceSelector" not in peer and pods == SOFTFLOW:
                    continue  # the cluster's own pods, in its namespace
                elif pods == SUBMITTER and namespaces == SUBMITTER and ports <= RAY_API_PORTS:
                    continue
                elif pods == OPERATOR and ports <= {8265}:
                    continue
                else:
                    problems.append(f"{name}: peer {peer} on ports {sorted(map(str, ports))}")
    if selected != {"all", "head"}:
        problems.append(f"policies select {sorted(selected)}; expected every softflow pod and the head")
    return problems


def test_network_policy_admits_ray_ports_only_from_labelled_submitters():
    """networkpolicy.yaml: softflow pods take traffic from each other; the head's 8265 and 10001 from pods and
    namespaces labelled softflow.io/ray-submitter=true, and 8265 from the KubeRay operator; nothing else."""
    doc = _load(NETWORK_POLICY)
    assert network_problems(doc) == []
    head = next(p for p in doc["items"] if p["spec"]["podSelector"]["matchLabels"].get("ray.io/node-type") == "head")
    ports = {p["port"] for rule in head["spec"]["ingress"] for p in rule["ports"]}
    assert ports == RAY_API_PORTS
    text = NETWORK_POLICY.read_text()
    assert "kubectl label namespace NAMESPACE softflow.io/ray-submitter=true" in text  # the label is documented


def test_network_check_catches_open_rules():
    """The check flags a rule without sources, an ipBlock, a submitter selector without the namespace label, the
    operator on 10001, and a missing policy."""
    doc = _load(NETWORK_POLICY)
    head_rules = doc["items"][1]["spec"]["ingress"]
    for breaking in (lambda r: r[0].pop("from"),
                     lambda r: r[0]["from"].append({"ipBlock": {"cidr": "0.0.0.0/0"}}),
                     lambda r: r[0]["from"][0].pop("namespaceSelector"),
                     lambda r: r[1]["ports"].append({"protocol": "TCP", "port": 10001})):
        broken = copy.deepcopy(doc)
        breaking(broken["items"][1]["spec"]["ingress"])
        assert network_problems(broken), breaking
    assert head_rules == _load(NETWORK_POLICY)["items"][1]["spec"]["ingress"]
    assert network_problems({"apiVersion": "v1", "kind": "List", "items": []}) == ["no NetworkPolicy"]


@pytest.mark.parametrize("path", KUBERAY_FILES, ids=_names(KUBERAY_FILES))
def test_every_pod_carries_the_label_the_network_policy_selects(path):
    for name, group in _groups(_load(path)):
        assert group["template"].get("metadata", {}).get("labels", {}).items() >= SOFTFLOW.items(), name


def _pod_specs(doc: dict) -> list[tuple[str, dict]]:
    specs = [(name, group["template"]["spec"]) for name, group in _groups(doc)]
    if doc.get("kind") == "RayJob":
        specs.append(("submitter", doc["spec"]["submitterPodTemplate"]["spec"]))
    return specs


def pod_security_problems(doc: dict) -> list[str]:
    """Pods that may run as root, and containers that may gain privileges or keep Linux capabilities."""
    problems = []
    for name, spec in _pod_specs(doc):
        pod = spec.get("securityContext", {})
        if pod.get("runAsNonRoot") is not True or not isinstance(pod.get("runAsUser"), int) or pod["runAsUser"] < 1:
            problems.append(f"{name}: securityContext needs runAsNonRoot: true and a runAsUser other than 0")
        for container in spec["containers"]:
            problems += container_problems(f"{name}/{container['name']}", container.get("securityContext", {}))
    autoscaler = _cluster_spec(doc).get("autoscalerOptions")
    if _cluster_spec(doc).get("enableInTreeAutoscaling"):
        problems += container_problems("autoscaler", (autoscaler or {}).get("securityContext", {}))
    return problems


def container_problems(where: str, context: dict) -> list[str]:
    problems = []
    if context.get("allowPrivilegeEscalation") is not False:
        problems.append(f"{where}: allowPrivilegeEscalation must be false")
    if "ALL" not in context.get("capabilities", {}).get("drop", []) or context.get("capabilities", {}).get("add"):
        problems.append(f"{where}: capabilities must drop ALL and add none")
    if context.get("privileged") or context.get("runAsUser") == 0 or context.get("runAsNonRoot") is False:
        problems.append(f"{where}: runs privileged or as root")
    return problems


@pytest.mark.parametrize("path", KUBERAY_FILES, ids=_names(KUBERAY_FILES))
def test_pods_run_as_non_root_without_privileges(path):
    assert pod_security_problems(_load(path)) == []


def test_pod_security_check_catches_root_and_capabilities():
    doc = _load(CLUSTER / "kuberay" / "raycluster.yaml")
    head = doc["spec"]["headGroupSpec"]["template"]["spec"]
    head["securityContext"] = {**head["securityContext"], "runAsNonRoot": False}
    head["containers"][0]["securityContext"] = {"capabilities": {"drop": ["ALL"], "add": ["NET_ADMIN"]}}
    doc["spec"]["autoscalerOptions"].pop("securityContext")
    problems = pod_security_problems(doc)
    assert any(p.startswith("head: securityContext") for p in problems)
    assert any(p.startswith("head/ray-head: capabilities") for p in problems)
    assert any(p.startswith("head/ray-head: allowPrivilegeEscalation") for p in problems)
    assert any(p.startswith("autoscaler:") for p in problems)


def wandb_key_problems(doc: dict) -> list[str]:
    """WANDB_API_KEY given as a value, or not from a Secret; and a head without it (the driver runs there)."""
    problems, head_has_it = [], False
    for name, spec in _pod_specs(doc):
        for container in spec["containers"]:
            for env in container.get("env") or []:
                if env["name"] != "WANDB_API_KEY":
                    continue
                head_has_it |= name == "head"
                if "value" in env or not env.get("valueFrom", {}).get("secretKeyRef", {}).get("name"):
                    problems.append(f"{name}/{container['name']}: WANDB_API_KEY must come from a secretKeyRef")
    return problems if head_has_it else problems + ["head: no WANDB_API_KEY from a Secret"]


@pytest.mark.parametrize("path", KUBERAY_FILES, ids=_names(KUBERAY_FILES))
def test_wandb_key_comes_from_a_secret_and_token_auth_stays_on(path):
    doc = _load(path)
    assert wandb_key_problems(doc) == []
    assert auth_problems(doc) == []
    assert not re.search(r"WANDB_API_KEY\s*[:=]\s*['\"]?\w", path.read_text())


def test_wandb_check_catches_a_literal_key():
    doc = _load(CLUSTER / "kuberay" / "rayjob.yaml")
    env = doc["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]["containers"][0]["env"]
    next(e for e in env if e["name"] == "WANDB_API_KEY").update(value="not-a-secret")
    assert wandb_key_problems(doc) == ["head/ray-head: WANDB_API_KEY must come from a secretKeyRef"]
    env[:] = [e for e in env if e["name"] != "WANDB_API_KEY"]
    assert wandb_key_problems(doc) == ["head: no WANDB_API_KEY from a Secret"]


def runtime_env_key_advice(text: str) -> list[str]:
    """Paragraphs that mention both a W&B (or other API) key and runtime_env: advice to pass a key that way."""
    paragraphs = re.split(r"\n\s*\n", text)
    return [p.strip()[:200] for p in paragraphs
            if re.search(r"runtime_env|runtimeEnv", p) and re.search(r"WANDB_API_KEY|API key|api_key", p)
            and not re.search(r"(?i)never|not into|instead of", p)]


@pytest.mark.parametrize("path", DOCS, ids=[p.name for p in DOCS])
def test_no_doc_suggests_a_key_in_runtime_env(path):
    assert runtime_env_key_advice(path.read_text()) == []


def test_runtime_env_advice_check():
    assert runtime_env_key_advice("W&B is online with `WANDB_API_KEY` in the job's `runtime_env`.")
    assert runtime_env_key_advice("Never put WANDB_API_KEY into a job's runtime_env.") == []
    assert runtime_env_key_advice("runtime_env: working_dir only.\n\nWANDB_API_KEY from a Secret.") == []
