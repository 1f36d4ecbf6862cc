"""Child manifests: valid Kubernetes objects, secure pods, router labels, one replicas writer, and a
config file the runtime's own `ServeConfig` accepts."""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml
from dsv4.operator import api, manifests
from dsv4.operator.manifests import EndpointRef
from dsv4.operator.observability.promql import metric_names
from dsv4.operator.planner import plan
from dsv4.runtime.server.config import ServeConfig, normalise_keys

from dsv4 import metrics_catalog as mc

ROOT = Path(__file__).resolve().parents[1]
REF = EndpointRef("chat", "team-a", "0b7c6f4e-1111-2222-3333-444455556666")
K8S = "1.37.0"


def load(name: str) -> api.DSV4EndpointSpec:
    return api.parse_spec(yaml.safe_load((ROOT / "examples" / name).read_text())["spec"])


def kinds(objs: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {o["kind"]: o for o in objs}


@pytest.mark.parametrize("example", ["short-chat.yaml", "long-context-agent.yaml"])
def test_children_are_valid_kubernetes_objects_owned_by_the_endpoint(example: str) -> None:
    spec = load(example)
    objs = manifests.children(REF, spec, plan(spec), with_pod_monitor=True)
    assert [o["kind"] for o in objs] == ["ConfigMap", "Deployment", "Service", "PodDisruptionBudget", "PodMonitor"]
    for o in objs:
        if o["apiVersion"] != "monitoring.coreos.com/v1":
            kubernetes_validate.validate(o, K8S, strict=True)
        assert o["metadata"]["namespace"] == REF.namespace
        (owner,) = o["metadata"]["ownerReferences"]
        assert owner == {"apiVersion": "serving.dsv4.dev/v1alpha1", "kind": "DSV4Endpoint", "name": "chat",
                         "uid": REF.uid, "controller": True, "blockOwnerDeletion": True}


def test_pod_shape_security_probes_and_router_labels() -> None:
    spec = load("short-chat.yaml")
    p = plan(spec)
    dep = kinds(manifests.children(REF, spec, p))["Deployment"]
    pod = dep["spec"]["template"]
    (c,) = pod["spec"]["containers"]
    assert c["command"] == ["dsv4", "serve", "--config", "/etc/dsv4/config.yaml"]
    gpus = str(p.gpus_per_replica)  # the TP group's or the DP ranks' GPUs
    assert p.gpus_per_replica == p.tensor_parallel_size * p.data_parallel_size
    assert c["resources"]["limits"]["nvidia.com/gpu"] == gpus and c["resources"]["requests"]["nvidia.com/gpu"] == gpus
    assert c["readinessProbe"]["httpGet"]["path"] == "/ready"
    assert c["livenessProbe"]["httpGet"]["path"] == "/health"
    assert c["startupProbe"]["httpGet"]["path"] == "/health"
    assert c["lifecycle"]["preStop"]["sleep"]["seconds"] < pod["spec"]["terminationGracePeriodSeconds"]
    sc = c["securityContext"]
    assert sc["runAsNonRoot"] and sc["readOnlyRootFilesystem"] and not sc["allowPrivilegeEscalation"]
    assert sc["capabilities"] == {"drop": ["ALL"]}
    assert pod["spec"]["securityContext"]["runAsNonRoot"]
    writable = {m["mountPath"] for m in c["volumeMounts"] if not m.get("readOnly")}
    assert writable == {"/tmp", "/dev/shm"}
    labels = pod["metadata"]["labels"]
    assert labels["llm-d.ai/engine-type"] == "vllm"
    assert labels["llm-d.ai/context-length-range"] == f"0-{p.max_model_len}"
    assert labels[mc.ENDPOINT_POD_LABEL_KEY] == "chat"
    assert dep["spec"]["selector"]["matchLabels"].items() <= labels.items()
    assert manifests.selector_string("chat") == ",".join(f"{k}={v}" for k, v in
                                                         dep["spec"]["selector"]["matchLabels"].items())
    mounts = {m["name"]: m for m in c["volumeMounts"]}
    assert mounts["weights"]["readOnly"] and "api-key" not in mounts  # the key comes as env (secretKeyRef)
    vols = {v["name"]: v for v in pod["spec"]["volumes"]}
    assert vols["weights"]["persistentVolumeClaim"] == {"claimName": "dsv4-flash-weights", "readOnly": True}


def test_placement_is_passed_through() -> None:
    spec = load("long-context-agent.yaml")
    pod = kinds(manifests.children(REF, spec, plan(spec)))["Deployment"]["spec"]["template"]["spec"]
    assert pod["nodeSelector"] == {"nvidia.com/gpu.product": "NVIDIA-B200"}
    assert pod["tolerations"][0]["key"] == "nvidia.com/gpu"
    assert pod["priorityClassName"] == "inference-high"
    assert pod["volumes"][-1]["hostPath"] == {"path": "/mnt/nvme/models/DeepSeek-V4-Pro", "type": "Directory"}


def test_runtime_config_is_accepted_by_the_runtime() -> None:
    """The ConfigMap's file goes through the runtime's own ServeConfig (keys and values)."""
    for example in ("short-chat.yaml", "long-context-agent.yaml"):
        spec = load(example)
        p = plan(spec)
        cm = kinds(manifests.children(REF, spec, p))["ConfigMap"]
        values = yaml.safe_load(cm["data"]["config.yaml"])
        assert set(values) <= set(manifests.CONFIG_KEYS)
        assert normalise_keys(values, "config file") == values  # every key is a runtime setting
        assert values["tp"] == p.tensor_parallel_size and values["max_model_len"] == p.max_model_len
        assert "pool_split" not in values  # the runtime derives the split exactly as the planner did
        # the planner sized the weights per GPU as stored (FP8/FP4): the runtime keeps them so
        assert spec.model.quantization == "fp8-fp4" and values["weights_dtype"] == "checkpoint"
    # a TP1 plan (this runtime build serves tp=1 only) is accepted as a whole, values included
    spec = api.parse_spec({"model": {"variant": "tiny"}, "profile": {"name": "short-chat"},
                           "accelerator": {"type": "cpu"}, "replicas": 1})
    p = plan(spec)
    assert p.tensor_parallel_size == 1
    values = yaml.safe_load(kinds(manifests.children(REF, spec, p))["ConfigMap"]["data"]["config.yaml"])
    cfg = ServeConfig.build(file_values=values)
    assert cfg.model is None and cfg.device == "cpu" and cfg.cache_policy == p.cache_policy
    assert cfg.batching_delay_ms == p.batching_delay_ms and cfg.expected_context == p.expected_context
    assert cfg.weights_dtype == "checkpoint"
    bf16 = spec.model_copy(update={"model": spec.model.model_copy(update={"quantization": "bf16"})})
    assert manifests.runtime_config(REF, bf16, plan(bf16))["weights_dtype"] == "bf16"
    dep = kinds(manifests.children(REF, spec, p))["Deployment"]
    res = dep["spec"]["template"]["spec"]["containers"][0]["resources"]
    assert "nvidia.com/gpu" not in res["requests"] and "nvidia.com/gpu" not in res["limits"]  # no GPU on cpu


def test_config_change_rolls_the_pods() -> None:
    spec = load("short-chat.yaml")
    a = kinds(manifests.children(REF, spec, plan(spec)))["Deployment"]
    spec2 = spec.model_copy(update={"overrides": api.Overrides(batching_delay_ms=9.0)})
    b = kinds(manifests.children(REF, spec2, plan(spec2)))["Deployment"]
    key = manifests.CONFIG_HASH_ANNOTATION
    hashes = {d["spec"]["template"]["metadata"]["annotations"][key] for d in (a, b)}
    assert len(hashes) == 2


def test_one_writer_for_replicas() -> None:
    builtin = load("short-chat.yaml")  # autoscaling enabled, builtin
    p = plan(builtin)
    dep = kinds(manifests.children(REF, builtin, p))["Deployment"]
    assert dep["spec"]["replicas"] == p.initial_replicas
    dep = kinds(manifests.children(REF, builtin, p, autoscaler_replicas=5))["Deployment"]
    assert dep["spec"]["replicas"] == 5
    fixed = load("long-context-agent.yaml")  # spec.replicas: 2
    assert kinds(manifests.children(REF, fixed, plan(fixed), autoscaler_replicas=7))["Deployment"]["spec"][
        "replicas"] == 2
    keda = builtin.model_copy(update={"autoscaling": builtin.autoscaling.model_copy(update={"mode": "keda"})})
    objs = kinds(manifests.children(REF, keda, plan(keda)))
    assert "replicas" not in objs["Deployment"]["spec"]  # KEDA/HPA owns it: SSA leaves it alone
    so = objs["ScaledObject"]
    assert so["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": "chat"}
    assert (so["spec"]["minReplicaCount"], so["spec"]["maxReplicaCount"]) == (1, 8)
    for trig in so["spec"]["triggers"]:
        q = trig["metadata"]["query"]
        names = metric_names(q)
        assert names and all(mc.family_of_series(n) for n in names), q
        assert 'dsv4_endpoint="chat"' in q and 'namespace="team-a"' in q


def test_pod_monitor_only_when_asked_and_uses_the_catalog_relabelings() -> None:
    spec = load("short-chat.yaml")
    p = plan(spec)
    assert "PodMonitor" not in kinds(manifests.children(REF, spec, p))
    pm = kinds(manifests.children(REF, spec, p, with_pod_monitor=True))["PodMonitor"]
    ep = pm["spec"]["podMetricsEndpoints"][0]
    assert ep["path"] == "/metrics" and ep["relabelings"] == mc.runtime_scrape_relabelings("operator")
    off = spec.model_copy(update={"monitoring": api.MonitoringSpec(pod_monitor=False)})
    assert "PodMonitor" not in kinds(manifests.children(REF, off, p, with_pod_monitor=True))


def b200_chat() -> api.DSV4EndpointSpec:
    """short-chat on one-GPU-per-node B200s: the cache bounds the raw tail, so the plan keeps the online HCA state."""
    spec = load("short-chat.yaml")
    return spec.model_copy(update={"accelerator": spec.accelerator.model_copy(
        update={"type": "B200", "gpus_per_node": 1})})


@pytest.mark.parametrize("example", ["short-chat.yaml", "long-context-agent.yaml", "b200-chat"])
def test_server_sizes_the_pools_of_its_plan_block_for_block(example: str) -> None:
    """The pod's config file, read by the runtime's own sizing code, gives the planned number of blocks per pool
    (a rounded budget or a floored split would give a server a slightly different cache than its plan)."""
    from dsv4.operator.planner import model_config
    from dsv4.runtime.server.build import cache_for_budget, cache_spec, expected_context

    spec = b200_chat() if example == "b200-chat" else load(example)
    p = plan(spec)
    values = yaml.safe_load(kinds(manifests.children(REF, spec, p))["ConfigMap"]["data"]["config.yaml"])
    cfg = ServeConfig(**values)
    # Pro over 8 B200s as DP8+EP holds 145 GB of weights per GPU (the experts split, the rest whole), leaving each
    # rank a cache where the raw tail and the online state both hold 9 sessions: raw (the fused kernel); the
    # b200-chat TP1 cache holds more with the online state
    want_hca = "online" if example == "b200-chat" else "raw"
    assert cfg.hca_state == p.hca_state == want_hca
    if p.layout == "dp-ep":  # each rank sizes its own pools from this per-GPU budget
        assert (cfg.dp, cfg.ep, cfg.tp) == (p.data_parallel_size, True, 1)
    else:
        assert (cfg.dp, cfg.ep, cfg.tp) == (1, False, p.tensor_parallel_size) and "dp" not in values
    mcfg = model_config(spec)
    budget = int(cfg.cache_budget_gib * 2**30)
    assert budget == p.cache_bytes_per_gpu
    cache = cache_for_budget(cfg, cache_spec(cfg, mcfg, values["kv_dtype"]), budget,
                             expected_context(cfg, int(mcfg.max_position_embeddings)))
    assert dict(cache.num_blocks) == dict(p.num_blocks)


def test_runtime_pods_get_planned_cpu_and_memory_and_are_burstable() -> None:
    from dsv4.operator.pod_resources import SHM_GIB, pod_resources, qos_class

    for name in ("short-chat.yaml", "long-context-agent.yaml"):
        spec = load(name)
        p = plan(spec)
        dep = kinds(manifests.children(REF, spec, p))["Deployment"]
        res = dep["spec"]["template"]["spec"]["containers"][0]["resources"]
        mem = int(res["requests"]["memory"].removesuffix("Gi"))
        # server + ranks + loader buffers; the limit adds the memory-backed /dev/shm; no CPU limit
        ranks = p.gpus_per_replica  # one process per TP or DP rank
        assert mem >= 4 + 2 * (ranks - 1) and res["limits"]["memory"] == f"{mem + SHM_GIB}Gi"
        assert int(res["requests"]["cpu"]) == 2 + ranks and "cpu" not in res["limits"]
        assert qos_class(res["requests"], res["limits"]) == "Burstable" == pod_resources(spec, p).qos
    # on cpu the weights and the KV cache live in host memory
    spec = api.parse_spec({"model": {"variant": "tiny"}, "profile": {"name": "short-chat"},
                           "accelerator": {"type": "cpu"}})
    p = plan(spec)
    assert int(pod_resources(spec, p).requests["memory"].removesuffix("Gi")) >= 4 + p.cache_bytes_per_gpu / 2**30
    # placement.resources replaces key by key; equal requests and limits: Guaranteed
    spec = api.parse_spec({**load("short-chat.yaml").model_dump(by_alias=True, exclude_none=True),
                           "placement": {"resources": {"requests": {"cpu": "8", "memory": "64Gi"},
                                                       "limits": {"cpu": "8", "memory": "64Gi"}}}})
    r = pod_resources(spec, plan(spec))
    assert r.requests["cpu"] == "8" and r.limits["memory"] == "64Gi" and r.qos == "Guaranteed"
    assert qos_class({}, {}) == "BestEffort"


def test_cpu_pods_request_the_bounded_step_working_set() -> None:
    """On cpu the request adds each rank's working set beyond weights + cache (runtime/malloc_tuning.py, the
    figure the serving bench checks peak RSS against); on accelerators it lives in device memory."""
    from dsv4.operator.pod_resources import cpu_working_set_gib, pod_resources
    from dsv4.runtime.malloc_tuning import serving_working_set_bytes

    assert cpu_working_set_gib(2) == 2 * serving_working_set_bytes() / 2**30 > 0
    spec = api.parse_spec({"model": {"variant": "tiny"}, "profile": {"name": "short-chat"},
                           "accelerator": {"type": "cpu"}})
    p = plan(spec)
    r = pod_resources(spec, p)
    ranks = p.gpus_per_replica
    loader = ranks * min(4, p.weight_bytes_per_gpu / 2**30)
    resident = (p.weight_bytes + p.cache_bytes_per_gpu) / 2**30
    without = 4 + 2 * (ranks - 1) + loader + resident
    assert int(r.requests["memory"].removesuffix("Gi")) == math.ceil(without + cpu_working_set_gib(ranks))
    assert "step working set" in r.reasons["memory"]
    gpu = load("short-chat.yaml")
    assert "step working set" not in pod_resources(gpu, plan(gpu)).reasons["memory"]


def test_runtime_pods_run_as_the_images_user_and_bound_their_disk() -> None:
    containerfile = (ROOT / "Containerfile").read_text()
    (image_uid,) = set(re.findall(r"^USER (\d+):\d+", containerfile, flags=re.M))
    spec = load("short-chat.yaml")
    pod = kinds(manifests.children(REF, spec, plan(spec)))["Deployment"]["spec"]["template"]["spec"]
    sc = pod["securityContext"]
    assert sc["runAsUser"] == sc["runAsGroup"] == sc["fsGroup"] == int(image_uid) > 10000
    assert pod["containers"][0]["securityContext"]["runAsUser"] == int(image_uid)
    res = pod["containers"][0]["resources"]
    tmp = next(v for v in pod["volumes"] if v["name"] == "tmp")["emptyDir"]["sizeLimit"]
    disk = res["requests"]["ephemeral-storage"]
    assert disk == res["limits"]["ephemeral-storage"]
    assert int(disk.removesuffix("Gi")) > int(tmp.removesuffix("Gi"))  # /tmp plus the logs


def test_multi_replica_endpoints_spread_over_nodes_and_zones() -> None:
    spec = load("short-chat.yaml")  # autoscaling up to several replicas
    pod = kinds(manifests.children(REF, spec, plan(spec)))["Deployment"]["spec"]["template"]["spec"]
    keys = [c["topologyKey"] for c in pod["topologySpreadConstraints"]]
    assert keys == ["kubernetes.io/hostname", "topology.kubernetes.io/zone"]
    assert all(c["whenUnsatisfiable"] == "ScheduleAnyway" for c in pod["topologySpreadConstraints"])
    one = api.parse_spec({"model": {"variant": "tiny"}, "profile": {"name": "short-chat"},
                          "accelerator": {"type": "cpu"}, "replicas": 1})
    pod = kinds(manifests.children(REF, one, plan(one)))["Deployment"]["spec"]["template"]["spec"]
    assert "topologySpreadConstraints" not in pod
    raw = spec.model_dump(by_alias=True, exclude_none=True)
    off = api.parse_spec({**raw, "placement": {"topologySpreadConstraints": []}})
    assert "topologySpreadConstraints" not in kinds(manifests.children(REF, off, plan(off)))["Deployment"]["spec"][
        "template"]["spec"]


def test_pdb_lets_unhealthy_pods_be_evicted_and_the_image_is_pinned() -> None:
    from dsv4.version import VERSION

    spec = load("short-chat.yaml")
    objs = kinds(manifests.children(REF, spec, plan(spec)))
    assert objs["PodDisruptionBudget"]["spec"]["unhealthyPodEvictionPolicy"] == "AlwaysAllow"
    assert manifests.DEFAULT_IMAGE == f"ghcr.io/dsv4/dsv4:{VERSION}" and not manifests.DEFAULT_IMAGE.endswith("latest")


def test_network_policy_is_opt_in_and_admits_the_namespace_prometheus_and_the_operator() -> None:
    from dsv4.operator.manifests import NetworkPolicyDefaults

    spec = load("short-chat.yaml")
    p = plan(spec)
    assert "NetworkPolicy" not in kinds(manifests.children(REF, spec, p))  # off by default
    chart = NetworkPolicyDefaults(enabled=True, operator_namespace="dsv4-system", prometheus_namespace="monitoring")
    np = kinds(manifests.children(REF, spec, p, network=chart))["NetworkPolicy"]
    kubernetes_validate.validate(np, K8S, strict=True)
    assert np["spec"]["podSelector"]["matchLabels"] == manifests.selector_labels("chat")
    (rule,) = np["spec"]["ingress"]
    assert rule["ports"] == [{"protocol": "TCP", "port": manifests.PORT}]
    assert rule["from"] == [{"podSelector": {}},
                            {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}}},
                            {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "dsv4-system"}}}]
    raw = spec.model_dump(by_alias=True, exclude_none=True)
    # the endpoint's own field wins over the chart's default, both ways; extra peers are appended
    off = api.parse_spec({**raw, "networkPolicy": {"enabled": False}})
    assert "NetworkPolicy" not in kinds(manifests.children(REF, off, p, network=chart))
    gw = {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "gateway"}}}
    on = api.parse_spec({**raw, "networkPolicy": {"enabled": True, "ingressFrom": [gw]}})
    np = kinds(manifests.children(REF, on, p))["NetworkPolicy"]
    assert np["spec"]["ingress"][0]["from"] == [{"podSelector": {}}, gw]
