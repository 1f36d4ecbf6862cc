"""Pure builders of an endpoint's child objects: ConfigMap, Deployment, Service, PDB, PodMonitor, ScaledObject.

`children(endpoint, plan, ...)` returns plain dicts ready for server-side apply. Nothing here talks
to the API server; the handlers decide which optional objects are wanted (PodMonitor only when the
monitoring.coreos.com CRDs exist, ScaledObject only in KEDA mode) and what `replicas` to write.

Runtime config file (`/etc/dsv4/config.yaml`, read by `dsv4 serve --config`): see `CONFIG_KEYS`.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any

import yaml
from dsv4.operator import api
from dsv4.operator.api import DSV4EndpointSpec
from dsv4.operator.planner import Plan
from dsv4.operator.pod_resources import SHM_GIB, TMP_GIB, pod_resources
from dsv4.runtime.server.config import ServeConfig

from dsv4 import metrics_catalog as mc
from dsv4.version import VERSION

FIELD_MANAGER = "dsv4-operator"
# when neither spec.image nor the operator's DSV4_RUNTIME_IMAGE is set: the runtime of the operator's own release
DEFAULT_IMAGE = f"ghcr.io/dsv4/dsv4:{VERSION}"
CONFIG_DIR = "/etc/dsv4"
CONFIG_PATH = f"{CONFIG_DIR}/config.yaml"
API_KEY_ENV = "DSV4_API_KEY"  # read by dsv4.runtime.server.config.read_api_key when api_key_file is unset
MODEL_DIR = "/models"
PORT = 8000
ENDPOINT_LABEL = mc.ENDPOINT_POD_LABEL_KEY  # "dsv4.io/endpoint"
ENGINE_TYPE_LABEL = "llm-d.ai/engine-type"
CONTEXT_RANGE_LABEL = "llm-d.ai/context-length-range"
CONFIG_HASH_ANNOTATION = "dsv4.io/config-hash"
PRESTOP_SLEEP_S = 10
RUN_AS_USER = 10001  # the image's `dsv4` user (Containerfile); above 10000, clear of the nodes' own users

# Keys of the runtime config file, with what each means: the settings of `dsv4 serve --config` (one source).
CONFIG_KEYS: dict[str, str] = ServeConfig.descriptions()


@dataclass(frozen=True)
class EndpointRef:
    name: str
    namespace: str
    uid: str

    def owner_reference(self) -> dict[str, Any]:
        return {"apiVersion": api.API_VERSION, "kind": api.KIND, "name": self.name, "uid": self.uid,
                "controller": True, "blockOwnerDeletion": True}


def selector_labels(name: str) -> dict[str, str]:
    return {ENDPOINT_LABEL: name, "app.kubernetes.io/component": "engine"}


def selector_string(name: str) -> str:
    return ",".join(f"{k}={v}" for k, v in selector_labels(name).items())


def common_labels(name: str) -> dict[str, str]:
    return {"app.kubernetes.io/name": "dsv4", "app.kubernetes.io/instance": name,
            "app.kubernetes.io/managed-by": FIELD_MANAGER, **selector_labels(name)}


def _meta(ref: EndpointRef, name: str, labels: dict[str, str] | None = None) -> dict[str, Any]:
    return {"name": name, "namespace": ref.namespace, "labels": labels or common_labels(ref.name),
            "ownerReferences": [ref.owner_reference()]}


def runtime_config(ref: EndpointRef, spec: DSV4EndpointSpec, plan: Plan) -> dict[str, Any]:
    """The runtime's config file as a dict (keys: CONFIG_KEYS)."""
    cfg: dict[str, Any] = {
        "served_model_name": spec.model.served_name or ref.name,
        "tp": plan.tensor_parallel_size,
        # dp/ep only for a DP+EP plan: a TP plan's config (and its hash, which rolls the pods) stays as it was
        "dp": plan.data_parallel_size if plan.layout == "dp-ep" else None,
        "ep": True if plan.layout == "dp-ep" else None,
        "profile": plan.profile if plan.profile != "custom" else None,
        "batching_delay_ms": plan.batching_delay_ms,
        "max_num_batched_tokens": plan.max_num_batched_tokens,
        "chunked_prefill_size": plan.chunked_prefill_size,
        "max_num_seqs": plan.max_num_seqs,
        "max_model_len": plan.max_model_len,
        "cache_policy": plan.cache_policy,
        "hca_state": plan.hca_state,
        "kv_dtype": plan.kv_dtype,
        # the planner sizes each rank's weights in the checkpoint's format (weights.weight_bytes_per_gpu): keep them
        # so; dequantising FP8/FP4 to bf16 at load would hold ~3.5x the planned bytes
        "weights_dtype": "bf16" if spec.model.quantization == "bf16" else "checkpoint",
        # exact (bytes / 2**30 is exact in binary floating point): the runtime splits this budget with the same
        # CacheManager.from_budget, expected context and prefill chunk as the planner, so the pools match the
        # plan block for block (test_server_sizes_the_pools_of_its_plan_block_for_block in
        # tests/test_operator_manifests.py); no pool_split is written for that reason
        "cache_budget_gib": plan.cache_bytes_per_gpu / 2**30,
        "expected_context": plan.expected_context,
        "host": "0.0.0.0",
        "port": PORT,
        "grace_period_s": max(1, spec.termination_grace_period_seconds - PRESTOP_SLEEP_S - 5),
    }
    if spec.model.weights is not None:
        cfg["model"] = MODEL_DIR
    if spec.accelerator.type == "cpu":
        cfg["device"] = "cpu"
    cfg = {k: v for k, v in cfg.items() if v is not None}
    # the API key is not in the config: the pod gets it as env API_KEY_ENV from the Secret (secretKeyRef)
    assert set(cfg) <= set(CONFIG_KEYS), set(cfg) - set(CONFIG_KEYS)
    return cfg


def config_map(ref: EndpointRef, spec: DSV4EndpointSpec, plan: Plan) -> dict[str, Any]:
    text = yaml.safe_dump(runtime_config(ref, spec, plan), sort_keys=True)
    return {"apiVersion": "v1", "kind": "ConfigMap", "metadata": _meta(ref, f"{ref.name}-config"),
            "data": {"config.yaml": text}}


def _config_hash(cm: dict[str, Any]) -> str:
    return hashlib.sha256(cm["data"]["config.yaml"].encode()).hexdigest()[:16]


def spread_constraints(name: str, spec: DSV4EndpointSpec, replicas: int | None) -> list[dict[str, Any]]:
    """Replicas spread over nodes and zones (soft: `ScheduleAnyway`, so a scale-up never waits for a free
    node or zone), per rollout revision; none for a single-replica endpoint; `placement` may replace them."""
    place = spec.placement
    if place is not None and place.topology_spread_constraints is not None:
        return list(place.topology_spread_constraints)
    a = spec.autoscaling
    most = a.max_replicas if a is not None and a.enabled else (replicas or 1)
    if most <= 1:
        return []
    return [{"maxSkew": 1, "topologyKey": key, "whenUnsatisfiable": "ScheduleAnyway",
             "labelSelector": {"matchLabels": selector_labels(name)}, "matchLabelKeys": ["pod-template-hash"]}
            for key in ("kubernetes.io/hostname", "topology.kubernetes.io/zone")]


def deployment(ref: EndpointRef, spec: DSV4EndpointSpec, plan: Plan, replicas: int | None,
               config_hash: str, default_image: str = DEFAULT_IMAGE) -> dict[str, Any]:
    """One pod per replica holding its GPUs (the TP group's or the DP ranks'). `replicas=None` omits spec.replicas
    (another writer, e.g. KEDA/HPA, owns it: server-side apply then leaves it alone)."""
    gpus = plan.gpus_per_replica
    pod_labels = {**common_labels(ref.name), ENGINE_TYPE_LABEL: "vllm",
                  CONTEXT_RANGE_LABEL: plan.context_length_range,
                  "serving.dsv4.dev/profile": plan.profile, "serving.dsv4.dev/model": spec.model.variant}
    gpu = spec.accelerator.resource_name
    place = spec.placement
    sized = pod_resources(spec, plan)
    if spec.accelerator.type == "cpu":
        resources = {"requests": sized.requests, "limits": sized.limits}
    else:
        resources = {"requests": {**sized.requests, gpu: str(gpus)}, "limits": {**sized.limits, gpu: str(gpus)}}
    mounts = [{"name": "config", "mountPath": CONFIG_DIR, "readOnly": True},
              {"name": "tmp", "mountPath": "/tmp"},
              {"name": "dshm", "mountPath": "/dev/shm"}]
    volumes: list[dict[str, Any]] = [
        {"name": "config", "configMap": {"name": f"{ref.name}-config"}},
        {"name": "tmp", "emptyDir": {"sizeLimit": f"{TMP_GIB}Gi"}},
        {"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": f"{SHM_GIB}Gi"}},
    ]
    w = spec.model.weights
    if w is not None:
        m = {"name": "weights", "mountPath": MODEL_DIR, "readOnly": True}
        if w.pvc is not None:
            volumes.append({"name": "weights", "persistentVolumeClaim": {"claimName": w.pvc.claim_name,
                                                                         "readOnly": True}})
            if w.pvc.sub_path:
                m["subPath"] = w.pvc.sub_path
        else:
            assert w.host_path is not None
            volumes.append({"name": "weights", "hostPath": {"path": w.host_path.path, "type": "Directory"}})
        mounts.append(m)
    env: list[dict[str, Any]] = [
        # writable places for a read-only root filesystem, and a user name for a uid without a passwd entry
        # (torch's compile caches call getpass.getuser(), which fails without USER for an arbitrary uid)
        {"name": "HOME", "value": "/tmp"}, {"name": "USER", "value": "dsv4"},
        {"name": "XDG_CACHE_HOME", "value": "/tmp/cache"}, {"name": "TRITON_CACHE_DIR", "value": "/tmp/triton"},
        {"name": "TORCHINDUCTOR_CACHE_DIR", "value": "/tmp/torchinductor"},
        {"name": "POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
    ]
    if spec.api_key_secret is not None:
        # the operator never reads the Secret: the kubelet resolves it into the runtime's DSV4_API_KEY
        env.append({"name": API_KEY_ENV, "valueFrom": {"secretKeyRef": {
            "name": spec.api_key_secret.name, "key": spec.api_key_secret.key, "optional": False}}})
    container = {
        "name": "dsv4",
        "image": spec.image or default_image,
        "imagePullPolicy": spec.image_pull_policy,
        "command": ["dsv4", "serve", "--config", CONFIG_PATH],
        "ports": [{"name": "http", "containerPort": PORT, "protocol": "TCP"}],
        "env": env,
        "resources": resources,
        "volumeMounts": mounts,
        # weights load + compile can take many minutes: startup probe allows 60 s + 190 x 6 s (~20 min)
        "startupProbe": {"httpGet": {"path": "/health", "port": "http"}, "initialDelaySeconds": 60,
                         "periodSeconds": 6, "failureThreshold": 190},
        "livenessProbe": {"httpGet": {"path": "/health", "port": "http"}, "periodSeconds": 10,
                          "failureThreshold": 6, "timeoutSeconds": 5},
        "readinessProbe": {"httpGet": {"path": "/ready", "port": "http"}, "periodSeconds": 5,
                           "failureThreshold": 2, "timeoutSeconds": 3},
        # let endpoints drop the pod before SIGTERM; the runtime then drains (503 to new requests)
        "lifecycle": {"preStop": {"sleep": {"seconds": PRESTOP_SLEEP_S}}},
        # a crash without a termination message gets the log's tail there: the operator's Degraded names it
        "terminationMessagePolicy": "FallbackToLogsOnError",
        "securityContext": {"runAsNonRoot": True, "runAsUser": RUN_AS_USER, "allowPrivilegeEscalation": False,
                            "readOnlyRootFilesystem": True, "capabilities": {"drop": ["ALL"]}},
    }
    pod_spec: dict[str, Any] = {
        "containers": [container],
        "volumes": volumes,
        "terminationGracePeriodSeconds": spec.termination_grace_period_seconds,
        "securityContext": {"runAsNonRoot": True, "runAsUser": RUN_AS_USER, "runAsGroup": RUN_AS_USER,
                            "fsGroup": RUN_AS_USER, "seccompProfile": {"type": "RuntimeDefault"}},
        "enableServiceLinks": False,
        "automountServiceAccountToken": False,
    }
    if place is not None:
        if place.node_selector:
            pod_spec["nodeSelector"] = dict(place.node_selector)
        if place.tolerations:
            pod_spec["tolerations"] = list(place.tolerations)
        if place.affinity:
            pod_spec["affinity"] = dict(place.affinity)
        if place.priority_class_name:
            pod_spec["priorityClassName"] = place.priority_class_name
    spread = spread_constraints(ref.name, spec, replicas)
    if spread:
        pod_spec["topologySpreadConstraints"] = spread
    dep_spec: dict[str, Any] = {
        "selector": {"matchLabels": selector_labels(ref.name)},
        # surge, never take a serving pod away first (a surge pod may wait for GPUs; traffic stays up)
        "strategy": {"type": "RollingUpdate", "rollingUpdate": {"maxSurge": 1, "maxUnavailable": 0}},
        "template": {"metadata": {"labels": pod_labels, "annotations": {CONFIG_HASH_ANNOTATION: config_hash}},
                     "spec": pod_spec},
    }
    if replicas is not None:
        dep_spec = {"replicas": int(replicas), **dep_spec}
    return {"apiVersion": "apps/v1", "kind": "Deployment", "metadata": _meta(ref, ref.name), "spec": dep_spec}


def service(ref: EndpointRef, spec: DSV4EndpointSpec) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "Service", "metadata": _meta(ref, ref.name),
            "spec": {"type": spec.service.type, "selector": selector_labels(ref.name),
                     "ports": [{"name": "http", "port": spec.service.port, "targetPort": "http",
                                "protocol": "TCP"}]}}


def pod_disruption_budget(ref: EndpointRef) -> dict[str, Any]:
    return {"apiVersion": "policy/v1", "kind": "PodDisruptionBudget", "metadata": _meta(ref, ref.name),
            # an unready pod (a startup probe runs up to ~20 min) must not block node drains
            "spec": {"maxUnavailable": 1, "selector": {"matchLabels": selector_labels(ref.name)},
                     "unhealthyPodEvictionPolicy": "AlwaysAllow"}}


@dataclass(frozen=True)
class NetworkPolicyDefaults:
    """What the operator knows for NetworkPolicies: the chart's default, and who else must reach the pods."""

    enabled: bool = False
    operator_namespace: str | None = None      # it scrapes the pods' /metrics (metricsSource: pods)
    prometheus_namespace: str | None = None


def network_policy_wanted(spec: DSV4EndpointSpec, defaults: NetworkPolicyDefaults) -> bool:
    np = spec.network_policy
    return defaults.enabled if np is None or np.enabled is None else np.enabled


def network_policy(ref: EndpointRef, spec: DSV4EndpointSpec, defaults: NetworkPolicyDefaults) -> dict[str, Any]:
    """Only the endpoint's namespace, Prometheus and the operator (and spec.networkPolicy.ingressFrom) reach the
    runtime's port; nothing else of the pods is restricted (egress stays open: weights, Secrets are mounted)."""
    peers: list[dict[str, Any]] = [{"podSelector": {}}]  # any pod of the endpoint's own namespace
    for ns in dict.fromkeys(n for n in (defaults.prometheus_namespace, defaults.operator_namespace) if n):
        if ns != ref.namespace:
            peers.append({"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": ns}}})
    if spec.network_policy and spec.network_policy.ingress_from:
        peers += list(spec.network_policy.ingress_from)
    return {"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy", "metadata": _meta(ref, ref.name),
            "spec": {"podSelector": {"matchLabels": selector_labels(ref.name)}, "policyTypes": ["Ingress"],
                     "ingress": [{"from": peers, "ports": [{"protocol": "TCP", "port": PORT}]}]}}


def pod_monitor(ref: EndpointRef) -> dict[str, Any]:
    return {"apiVersion": "monitoring.coreos.com/v1", "kind": "PodMonitor", "metadata": _meta(ref, ref.name),
            "spec": {"selector": {"matchLabels": selector_labels(ref.name)},
                     "podMetricsEndpoints": [{"port": "http", "path": "/metrics", "interval": "15s",
                                              "relabelings": mc.runtime_scrape_relabelings("operator")}]}}


def keda_queries(ref: EndpointRef) -> dict[str, str]:
    """PromQL of the ScaledObject: the sum over pods of each signal (KEDA AverageValue divides by the target)."""
    sel = f'namespace="{ref.namespace}",{mc.ENDPOINT_LABEL}="{ref.name}"'
    return {
        "occupancy": f"sum(max by (pod) (dsv4_cache_pool_occupancy_ratio{{{sel}}}))",
        "queue": f"sum(vllm:num_requests_waiting{{{sel}}})",
    }


def scaled_object(ref: EndpointRef, spec: DSV4EndpointSpec) -> dict[str, Any]:
    a = spec.autoscaling
    assert a is not None
    q = keda_queries(ref)
    triggers = [
        {"type": "prometheus", "name": "cache-occupancy", "metricType": "AverageValue",
         "metadata": {"serverAddress": a.prometheus_address, "query": q["occupancy"],
                      "threshold": str(a.target_occupancy)}},
        {"type": "prometheus", "name": "queue-depth", "metricType": "AverageValue",
         "metadata": {"serverAddress": a.prometheus_address, "query": q["queue"],
                      "threshold": str(a.target_queue_depth)}},
    ]
    return {"apiVersion": "keda.sh/v1alpha1", "kind": "ScaledObject", "metadata": _meta(ref, ref.name),
            "spec": {"scaleTargetRef": {"apiVersion": "apps/v1", "kind": "Deployment", "name": ref.name},
                     "minReplicaCount": a.min_replicas, "maxReplicaCount": a.max_replicas,
                     "pollingInterval": 15, "cooldownPeriod": a.scale_down_stabilization_seconds,
                     "initialCooldownPeriod": 1200,
                     # metrics missing: hold the current replicas instead of guessing
                     "fallback": {"failureThreshold": 3, "replicas": a.min_replicas, "behavior": "currentReplicas"},
                     "advanced": {"horizontalPodAutoscalerConfig": {"behavior": {
                         "scaleDown": {"stabilizationWindowSeconds": a.scale_down_stabilization_seconds}}}},
                     "triggers": triggers}}


def deployment_replicas(spec: DSV4EndpointSpec, plan: Plan, autoscaler_replicas: int | None) -> int | None:
    """What the operator writes to Deployment.spec.replicas; None when KEDA owns it.

    builtin autoscaling: the autoscaler's decision (the plan's initial replicas before the first one);
    otherwise spec.replicas (which HPA/`kubectl scale` may write through /scale), else the plan's."""
    if spec.keda_autoscaling:
        return None
    if spec.builtin_autoscaling:
        return plan.initial_replicas if autoscaler_replicas is None else autoscaler_replicas
    return spec.replicas if spec.replicas is not None else plan.initial_replicas


def children(ref: EndpointRef, spec: DSV4EndpointSpec, plan: Plan, *, autoscaler_replicas: int | None = None,
             with_pod_monitor: bool = False, default_image: str = DEFAULT_IMAGE,
             network: NetworkPolicyDefaults = NetworkPolicyDefaults()) -> list[dict[str, Any]]:
    """Every child object the endpoint should have, in apply order."""
    cm = config_map(ref, spec, plan)
    replicas = deployment_replicas(spec, plan, autoscaler_replicas)
    objs = [cm, deployment(ref, spec, plan, replicas, _config_hash(cm), default_image),
            service(ref, spec), pod_disruption_budget(ref)]
    if with_pod_monitor and spec.monitoring.pod_monitor:
        objs.append(pod_monitor(ref))
    if spec.keda_autoscaling:
        objs.append(scaled_object(ref, spec))
    if network_policy_wanted(spec, network):
        objs.append(network_policy(ref, spec, network))
    return objs


def endpoint_url(ref: EndpointRef, spec: DSV4EndpointSpec) -> str:
    return f"http://{ref.name}.{ref.namespace}.svc:{spec.service.port}/v1"
