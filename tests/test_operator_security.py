"""Runtime pods are locked down (non-root, read-only root filesystem with emptyDirs for what the runtime
writes, no privilege escalation, no capabilities, RuntimeDefault seccomp, no API token), and the optional
API key goes CR → Secret reference → pod env → the runtime's bearer check, without the operator reading it."""

from __future__ import annotations

import copy
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pytest
import yaml
from dsv4.operator import api, manifests
from dsv4.operator.planner import plan_cached
from dsv4.runtime.server.config import ServeConfig, read_api_key

ROOT = Path(__file__).resolve().parents[1]
REF = manifests.EndpointRef("chat", "team-a", "uid-1")
EXAMPLES = [p for p in sorted((ROOT / "examples").glob("*.yaml")) if "invalid" not in p.name]
TINY = {"model": {"variant": "tiny"}, "profile": {"name": "short-chat"}, "accelerator": {"type": "cpu"},
        "replicas": 1, "apiKeySecret": {"name": "chat-key", "key": "token"}}


def children(spec_dict: dict[str, Any]) -> dict[str, dict[str, Any]]:
    spec = api.parse_spec(copy.deepcopy(spec_dict))
    return {o["kind"]: o for o in manifests.children(REF, spec, plan_cached(spec), with_pod_monitor=True)}


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_pod_security_context(path: Path) -> None:
    pod = children(yaml.safe_load(path.read_text())["spec"])["Deployment"]["spec"]["template"]["spec"]
    psc = pod["securityContext"]
    assert psc["runAsNonRoot"] is True and psc["runAsUser"] > 0 and psc["runAsGroup"] > 0
    assert psc["seccompProfile"] == {"type": "RuntimeDefault"}
    assert pod["automountServiceAccountToken"] is False and pod["enableServiceLinks"] is False
    assert "hostNetwork" not in pod and "hostPID" not in pod and "hostIPC" not in pod
    for c in pod["containers"] + pod.get("initContainers", []):
        sc = c["securityContext"]
        assert sc["runAsNonRoot"] is True and sc["runAsUser"] == psc["runAsUser"]
        assert sc["readOnlyRootFilesystem"] is True and sc["allowPrivilegeEscalation"] is False
        assert sc["capabilities"] == {"drop": ["ALL"]} and not sc.get("privileged")
        writable = {m["mountPath"] for m in c["volumeMounts"] if not m.get("readOnly")}
        assert writable == {"/tmp", "/dev/shm"}, writable
        env = {e["name"]: e.get("value") for e in c["env"]}
        # everything the runtime writes (home, caches of HF, Triton, torch inductor) is under the /tmp emptyDir
        for var in ("HOME", "XDG_CACHE_HOME", "TRITON_CACHE_DIR", "TORCHINDUCTOR_CACHE_DIR"):
            assert env[var].startswith("/tmp"), var
        assert env["USER"], "getpass.getuser() needs USER for a uid without a passwd entry"
    vols = {v["name"]: v for v in pod["volumes"]}
    assert vols["tmp"]["emptyDir"]["sizeLimit"] and vols["dshm"]["emptyDir"]["medium"] == "Memory"
    assert not [v for v in pod["volumes"] if "hostPath" in v and v["name"] != "weights"]


def test_api_key_comes_from_the_secret_reference_as_env_not_from_the_operator() -> None:
    objs = children(TINY)
    (c,) = objs["Deployment"]["spec"]["template"]["spec"]["containers"]
    (ref,) = [e for e in c["env"] if e["name"] == manifests.API_KEY_ENV]
    assert ref["valueFrom"] == {"secretKeyRef": {"name": "chat-key", "key": "token", "optional": False}}
    assert "value" not in ref
    # no Secret content anywhere in what the operator writes
    assert "Secret" not in objs and "chat-key" not in objs["ConfigMap"]["data"]["config.yaml"]
    assert all(v.get("secret") is None for v in objs["Deployment"]["spec"]["template"]["spec"]["volumes"])
    no_key = children({k: v for k, v in TINY.items() if k != "apiKeySecret"})
    (c,) = no_key["Deployment"]["spec"]["template"]["spec"]["containers"]
    assert manifests.API_KEY_ENV not in {e["name"] for e in c["env"]}


def pod_env(container: dict[str, Any], secrets: dict[str, dict[str, str]]) -> dict[str, str]:
    """What the kubelet puts in the container's environment (value and secretKeyRef entries)."""
    out = {}
    for e in container["env"]:
        if "value" in e:
            out[e["name"]] = e["value"]
        elif "secretKeyRef" in e.get("valueFrom", {}):
            ref = e["valueFrom"]["secretKeyRef"]
            out[e["name"]] = secrets[ref["name"]][ref["key"]]
    return out


def test_the_runtime_reads_the_key_the_pod_gets(monkeypatch: pytest.MonkeyPatch) -> None:
    objs = children(TINY)
    (c,) = objs["Deployment"]["spec"]["template"]["spec"]["containers"]
    env = pod_env(c, {"chat-key": {"token": "s3cret"}})
    cfg = ServeConfig.build(file_values=yaml.safe_load(objs["ConfigMap"]["data"]["config.yaml"]))
    monkeypatch.setenv(manifests.API_KEY_ENV, env[manifests.API_KEY_ENV])
    assert read_api_key(cfg) == "s3cret"
    monkeypatch.delenv(manifests.API_KEY_ENV)
    assert read_api_key(cfg) is None


@pytest.mark.slow
def test_api_key_enforced_end_to_end_by_a_real_server(tmp_path: Path) -> None:
    """The ConfigMap's config file and the pod's env (Secret resolved) start a real `dsv4 serve`: requests
    without the key get 401, with it 200."""
    import json

    from dsv4.runtime.server.launch import start_server

    objs = children(TINY)
    (c,) = objs["Deployment"]["spec"]["template"]["spec"]["containers"]
    env = pod_env(c, {"chat-key": {"token": "s3cret"}})
    cfg = yaml.safe_load(objs["ConfigMap"]["data"]["config.yaml"])
    cfg["cache_budget_gib"] = 0.25  # the plan sizes ~7 GB for a cpu pod; this shared test host gets less
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(cfg))
    env = {**env, "HOME": str(tmp_path), "XDG_CACHE_HOME": str(tmp_path / "cache"),
           "TRITON_CACHE_DIR": str(tmp_path / "triton"), "TORCHINDUCTOR_CACHE_DIR": str(tmp_path / "ind")}
    sp = start_server(["--config", str(tmp_path / "config.yaml")], env={k: v for k, v in env.items()
                                                                         if k != "POD_NAME"})
    try:
        body = json.dumps({"model": cfg["served_model_name"], "prompt": "hi", "max_tokens": 2}).encode()

        def post(key: str | None) -> int:
            headers = {"content-type": "application/json"} | ({"authorization": f"Bearer {key}"} if key else {})
            req = urllib.request.Request(sp.base_url + "/v1/completions", data=body, headers=headers)
            try:
                with urllib.request.urlopen(req, timeout=60) as r:
                    return r.status
            except urllib.error.HTTPError as e:
                return e.code

        assert post(None) == 401 and post("wrong") == 401 and post("s3cret") == 200
    finally:
        assert sp.stop() == 0, sp.log()[-3000:]
