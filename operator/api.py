"""The `DSV4Endpoint` API (group serving.dsv4.dev, version v1alpha1): pydantic models for spec and status.

These models are the single source of truth: `crdgen.py` turns them into the CRD's structural
OpenAPI schema (descriptions become `kubectl explain` text), the handlers parse custom objects with
them, and `dsv4 plan -f endpoint.yaml` validates with them. Cross-field rules exist twice, on
purpose: as CEL `x-kubernetes-validations` (enforced by the API server before the operator ever
sees the object) and as pydantic validators with the same messages (so `dsv4 plan` and the
operator reject the same objects when the CRD is old or CEL is off).
"""

from __future__ import annotations

import datetime as dt
import re
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator
from pydantic.alias_generators import to_camel

from dsv4.settings_enums import CachePolicy, HcaState, ProfileName

GROUP = "serving.dsv4.dev"
VERSION = "v1alpha1"
KIND = "DSV4Endpoint"
PLURAL = "dsv4endpoints"
SINGULAR = "dsv4endpoint"
SHORT_NAMES = ["dsv4ep"]
API_VERSION = f"{GROUP}/{VERSION}"

MAX_SCALING_HISTORY = 5
MAX_PLAN_HISTORY = 5

# Shapes of names the children inherit (Kubernetes' own validation of those objects, checked up front so a bad
# value is rejected by the API server when the DSV4Endpoint is applied, not later when a child is).
DNS_SUBDOMAIN = r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$"              # Secret, PVC, PriorityClass names (<= 253)
DNS_LABEL_1035 = r"^[a-z]([-a-z0-9]*[a-z0-9])?$"                 # Service names (<= 63)
LABEL_VALUE = r"^(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?$"    # label values (<= 63)
SECRET_KEY = r"^[-._a-zA-Z0-9]+$"                                 # keys of a Secret's data
EXTENDED_RESOURCE = r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?/[A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?$"
QUANTITY = r"^[+]?(([0-9]+(\.[0-9]*)?)|(\.[0-9]+))(([KMGTPE]i)|[mkMGTPE]|([eE][+]?[0-9]+))?$"  # non-negative
MAX_NAME_LEN = 63

# Rules on metadata.name, evaluated at the schema root (the only place CEL may read metadata.name). The endpoint's
# name becomes a Service name (DNS-1035 label, <= 63 characters) and a label value.
NAME_RULES = [
    {"rule": f"size(self.metadata.name) <= {MAX_NAME_LEN}",
     "message": f"metadata.name must be at most {MAX_NAME_LEN} characters (it names the endpoint's Service)"},
    {"rule": f"self.metadata.name.matches('{DNS_LABEL_1035}')",
     "message": "metadata.name must start with a lower-case letter and contain only a-z, 0-9 and '-' "
                "(a DNS-1035 label: it names the endpoint's Service)"},
]


# The `/scale` subresource reads `.spec.replicas`, so the operator keeps it present in every mode (see
# replica_owner.py). With autoscaling on, it mirrors the autoscaler's decision (status.desiredReplicas); anyone
# else changing it (`kubectl scale`, an HPA, a PUT on /scale) is refused here. `optionalOldSelf`: the rule also
# runs on create (oldSelf empty, status not stored yet), so replicas together with autoscaling is refused there.
SCALE_MESSAGE = ("autoscaling.enabled is true: the autoscaler owns replicas (spec.replicas mirrors "
                 "status.desiredReplicas); change autoscaling.minReplicas/maxReplicas, or set autoscaling.enabled: "
                 "false to set replicas by hand")
SCALE_RULES = [
    {"rule": "!has(self.spec.autoscaling) || !self.spec.autoscaling.enabled || !has(self.spec.replicas) "
             "|| (oldSelf.hasValue() && has(oldSelf.value().spec.replicas) "
             "&& self.spec.replicas == oldSelf.value().spec.replicas) "
             "|| (has(self.status) && has(self.status.desiredReplicas) "
             "&& self.spec.replicas == self.status.desiredReplicas)",
     "message": SCALE_MESSAGE, "fieldPath": ".spec.replicas", "optionalOldSelf": True},
]


def name_problem(name: str) -> str | None:
    """The pydantic-side twin of NAME_RULES: the message of the first rule `name` breaks, else None."""
    if len(name) > MAX_NAME_LEN:
        return NAME_RULES[0]["message"]
    if not re.fullmatch(DNS_LABEL_1035, name):
        return NAME_RULES[1]["message"]
    return None


Quantity = Annotated[str, Field(pattern=QUANTITY, max_length=64)]
LabelValue = Annotated[str, Field(pattern=LABEL_VALUE, max_length=63)]


def _cel(rule: str, message: str, field_path: str | None = None) -> dict[str, str]:
    d = {"rule": rule, "message": message}
    if field_path:
        d["fieldPath"] = field_path
    return d


class _Model(BaseModel):
    """camelCase on the wire (Kubernetes style), snake_case in Python; unknown fields are errors."""

    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, extra="forbid")

    def wire(self) -> dict[str, Any]:
        """The object as it appears in Kubernetes: camelCase keys, unset optional fields omitted."""
        return self.model_dump(by_alias=True, exclude_none=True, mode="json")


# ---------------------------------------------------------------------------------------------
# spec
# ---------------------------------------------------------------------------------------------
class PVCSource(_Model):
    claim_name: str = Field(min_length=1, max_length=253, pattern=DNS_SUBDOMAIN,
                            description="Name of a PersistentVolumeClaim in the endpoint's namespace.")
    sub_path: str | None = Field(None, max_length=4096, pattern=r"^[^/]", description="Folder inside the volume "
                                 "that holds config.json and the weights (relative).")


class HostPathSource(_Model):
    path: str = Field(min_length=2, max_length=4096, pattern=r"^/",
                      description="Absolute folder on the node holding config.json and the weights.")


class WeightsSource(_Model):
    model_config = ConfigDict(json_schema_extra={"x-kubernetes-validations": [
        _cel("has(self.pvc) != has(self.hostPath)", "weights: set exactly one of pvc or hostPath"),
    ]})
    pvc: PVCSource | None = Field(None, description="Weights on a PersistentVolumeClaim (mounted read-only).")
    host_path: HostPathSource | None = Field(None, description="Weights on a node folder (pre-staged NVMe).")

    @model_validator(mode="after")
    def _one_source(self) -> WeightsSource:
        if (self.pvc is None) == (self.host_path is None):
            raise ValueError("weights: set exactly one of pvc or hostPath")
        return self


class ModelSpec(_Model):
    model_config = ConfigDict(json_schema_extra={"x-kubernetes-validations": [
        _cel("self.variant != 'custom' || has(self.config)",
             "model.config (the checkpoint's config.json) is required when model.variant is custom"),
        _cel("self.variant == 'tiny' || has(self.weights)",
             "model.weights is required unless model.variant is tiny (the built-in random model)"),
    ]})
    variant: Literal["flash", "pro", "tiny", "custom"] = Field(
        description="Model shapes: flash (DeepSeek-V4-Flash), pro (DeepSeek-V4-Pro), tiny (built-in test model), "
                    "or custom (shapes from model.config).")
    served_name: str | None = Field(
        None, max_length=253, description="Model name clients send in OpenAI requests; defaults to the endpoint name.")
    weights: WeightsSource | None = Field(
        None, description="Where the checkpoint (config.json, tokenizer, safetensors) lives.")
    quantization: Literal["fp8-fp4", "fp8", "bf16"] = Field(
        "fp8-fp4",
        description="Weight format: fp8-fp4 (FP8 linear layers, FP4 routed experts, as released), fp8, or bf16.")
    kv_dtype: Literal["fp8", "bf16"] = Field("fp8", description="Storage format of the KV cache rows.")
    config: dict[str, Any] | None = Field(
        None, description="config.json of a custom checkpoint (transformers or DeepSeek layout); used for planning.",
        json_schema_extra={"x-kubernetes-preserve-unknown-fields": True})

    @model_validator(mode="after")
    def _rules(self) -> ModelSpec:
        if self.variant == "custom" and not self.config:
            raise ValueError("model.config (the checkpoint's config.json) is required when model.variant is custom")
        if self.variant != "tiny" and self.weights is None:
            raise ValueError("model.weights is required unless model.variant is tiny (the built-in random model)")
        return self


class CustomProfile(_Model):
    model_config = ConfigDict(json_schema_extra={"x-kubernetes-validations": [
        _cel("self.contextP50 <= self.contextP95 && self.contextP95 <= self.contextMax",
             "profile.custom: contextP50 <= contextP95 <= contextMax must hold"),
    ]})
    context_p50: int = Field(ge=1, le=1 << 21, description="Median prompt + history length in tokens.")
    context_p95: int = Field(ge=1, le=1 << 21, description="95th-percentile prompt + history length in tokens.")
    context_max: int = Field(ge=1, le=1 << 21, description="Longest context a request may have; must be servable.")
    output_tokens: int = Field(512, ge=1, le=1 << 20, description="Typical generated tokens per request.")
    prefix_reuse_ratio: float = Field(0.0, ge=0.0, le=1.0,
                                      description="Fraction of prompt tokens expected to hit the prefix cache (0-1).")
    ttft_target_ms: int = Field(2000, ge=1, le=3_600_000, description="Target time to first token, milliseconds.")
    itl_target_ms: int = Field(50, ge=1, le=10_000, description="Target inter-token latency, milliseconds.")
    concurrency: int = Field(16, ge=1, le=1_000_000, description="Expected concurrent sessions across the endpoint.")

    @model_validator(mode="after")
    def _order(self) -> CustomProfile:
        if not (self.context_p50 <= self.context_p95 <= self.context_max):
            raise ValueError("profile.custom: contextP50 <= contextP95 <= contextMax must hold")
        return self


class ProfileSpec(_Model):
    model_config = ConfigDict(json_schema_extra={"x-kubernetes-validations": [
        _cel("(self.name == 'custom') == has(self.custom)",
             "profile.custom must be set exactly when profile.name is custom"),
    ]})
    name: Literal[ProfileName, "custom"] = Field(
        description="Workload profile: a named preset, or custom (then profile.custom describes the workload).")
    custom: CustomProfile | None = Field(None, description="The workload, when name is custom.")
    concurrency: int | None = Field(None, ge=1, le=1_000_000,
                                    description="Expected concurrent sessions; overrides the named profile's default.")

    @model_validator(mode="after")
    def _custom(self) -> ProfileSpec:
        if (self.name == "custom") != (self.custom is not None):
            raise ValueError("profile.custom must be set exactly when profile.name is custom")
        return self


class AcceleratorSpec(_Model):
    model_config = ConfigDict(json_schema_extra={"x-kubernetes-validations": [
        _cel("self.type != 'custom' || has(self.memoryGiB)", "accelerator.memoryGiB is required when type is custom"),
    ]})
    type: Literal["H100", "H200", "B200", "B200-192", "custom", "cpu"] = Field(
        "H200", description="GPU model: H100 (80 GB), H200 (141 GB), B200 (180 GB), B200-192 (192 GB), custom "
                            "(memoryGiB required), or cpu (no GPU: test clusters with the tiny model).")
    memory_gi_b: float | None = Field(None, alias="memoryGiB", gt=0, le=4096,
                                      description="GPU memory in GiB; overrides the type's preset.")
    gpus_per_node: int = Field(8, ge=1, le=64, description="GPUs on one node: the largest tensor-parallel group.")
    resource_name: str = Field("nvidia.com/gpu", max_length=253, pattern=EXTENDED_RESOURCE,
                               description="Extended resource name requested per GPU (domain/name).")

    @model_validator(mode="after")
    def _mem(self) -> AcceleratorSpec:
        if self.type == "custom" and self.memory_gi_b is None:
            raise ValueError("accelerator.memoryGiB is required when type is custom")
        return self


Layout = Literal["tp", "dp-ep"]
_DP_CONFLICT = ("overrides.dataParallelSize means data-parallel attention ranks with expert parallelism (layout "
                "dp-ep): it excludes layout tp")


class Overrides(_Model):
    model_config = ConfigDict(json_schema_extra={"x-kubernetes-validations": [
        _cel("!has(self.dataParallelSize) || !has(self.layout) || self.layout == 'dp-ep'", _DP_CONFLICT),
    ]})
    tensor_parallel_size: int | None = Field(
        None, ge=1, le=64, description="TP group size: GPUs per replica (layout tp, the default when set alone), or "
                                       "GPUs of each data-parallel rank (with dataParallelSize or layout dp-ep).")
    layout: Layout | None = Field(
        None, description="How a replica uses its GPUs: tp (one tensor-parallel group, one KV cache) or dp-ep "
                          "(data-parallel attention ranks, each a TP group with its own KV cache, the routed experts "
                          "split over all GPUs).")
    data_parallel_size: int | None = Field(
        None, ge=2, le=64, description="Data-parallel attention ranks per replica with expert parallelism, each a "
                                       "TP group of tensorParallelSize GPUs (default 1); implies layout dp-ep.")
    batching_delay_ms: float | None = Field(None, ge=0, le=1000, description="Scheduler batching delay, milliseconds.")
    cache_policy: CachePolicy | None = Field(
        None, description="Sliding-window cache policy for prefix reuse: full, checkpoint, or recompute.")
    hca_state: HcaState | None = Field(
        None, description="HCA compressor state: raw tail rows, or one online-softmax slot per open group.")
    max_num_batched_tokens: int | None = Field(None, ge=16, le=1 << 20,
                                               description="Token budget of one scheduler step.")
    max_model_len: int | None = Field(None, ge=16, le=1 << 21, description="Cap on context length per request.")

    @model_validator(mode="after")
    def _parallel(self) -> Overrides:
        if self.data_parallel_size is not None and self.layout == "tp":
            raise ValueError(_DP_CONFLICT)
        return self


class AutoscalingSpec(_Model):
    model_config = ConfigDict(json_schema_extra={"x-kubernetes-validations": [
        _cel("self.minReplicas <= self.maxReplicas", "autoscaling.minReplicas must be <= autoscaling.maxReplicas"),
        _cel("self.panicWindowSeconds <= self.stableWindowSeconds",
             "autoscaling.panicWindowSeconds must be <= autoscaling.stableWindowSeconds"),
    ]})
    enabled: bool = Field(False, description="Scale replicas on per-pool cache occupancy and queue depth.")
    mode: Literal["builtin", "keda"] = Field(
        "builtin", description="builtin: the operator decides and writes replicas; keda: emit a KEDA ScaledObject.")
    min_replicas: int = Field(1, ge=0, le=1000, description="Fewest replicas.")
    max_replicas: int = Field(4, ge=1, le=1000, description="Most replicas.")
    target_occupancy: float = Field(0.8, gt=0, le=1, description="Target occupancy of the fullest cache pool (0-1).")
    target_queue_depth: float = Field(5.0, gt=0, le=100000, description="Target waiting requests per replica.")
    stable_window_seconds: int = Field(60, ge=6, le=3600, description="Averaging window of the stable mode.")
    panic_window_seconds: int = Field(6, ge=1, le=3600, description="Averaging window of the panic mode.")
    panic_threshold: float = Field(2.0, gt=1, le=100,
                                   description="Enter panic when panic-window desired / ready replicas reaches this.")
    scale_down_stabilization_seconds: int = Field(
        300, ge=0, le=86400, description="Scale down only to the highest recommendation of this window.")
    max_scale_up_rate: float = Field(2.0, gt=1, le=1000, description="At most ready x this replicas after one step.")
    max_scale_down_rate: float = Field(2.0, gt=1, le=1000, description="At least ready / this replicas after one step.")
    metrics_stale_seconds: int = Field(45, ge=1, le=3600, description="Samples older than this count as missing: hold.")
    metrics_source: Literal["pods", "prometheus"] = Field(
        "pods", description="Where the built-in autoscaler reads occupancy and queue depth: pods (each ready pod's "
                            "/metrics) or prometheus (instant queries to prometheusAddress).")
    prometheus_address: str = Field("http://prometheus-operated.monitoring.svc:9090", max_length=2048,
                                    pattern=r"^https?://[^\s]+$",
                                    description="Prometheus (http(s) URL) the KEDA ScaledObject queries (mode keda) "
                                                "and the built-in autoscaler with metricsSource prometheus.")

    @model_validator(mode="after")
    def _bounds(self) -> AutoscalingSpec:
        if self.min_replicas > self.max_replicas:
            raise ValueError(f"autoscaling.minReplicas ({self.min_replicas}) must be <= "
                             f"autoscaling.maxReplicas ({self.max_replicas})")
        if self.panic_window_seconds > self.stable_window_seconds:
            raise ValueError("autoscaling.panicWindowSeconds must be <= autoscaling.stableWindowSeconds")
        return self


class ResourceRequirements(_Model):
    requests: dict[str, Quantity] | None = Field(
        None, description="Extra resource requests (cpu, memory) per pod, as Kubernetes quantities.")
    limits: dict[str, Quantity] | None = Field(
        None, description="Extra resource limits per pod, as Kubernetes quantities; GPUs are set by the plan.")


class PlacementSpec(_Model):
    node_selector: dict[str, LabelValue] | None = Field(None, description="Node labels the pods must match.")
    tolerations: list[dict[str, Any]] | None = Field(
        None, description="Pod tolerations (core/v1 Toleration objects).",
        json_schema_extra={"items": {"type": "object", "x-kubernetes-preserve-unknown-fields": True}})
    affinity: dict[str, Any] | None = Field(None, description="Pod affinity (core/v1 Affinity object).",
                                            json_schema_extra={"x-kubernetes-preserve-unknown-fields": True})
    priority_class_name: str | None = Field(None, max_length=253, pattern=DNS_SUBDOMAIN,
                                            description="PriorityClass of the pods.")
    resources: ResourceRequirements | None = Field(
        None, description="cpu/memory requests and limits replacing the planned ones key by key.")
    topology_spread_constraints: list[dict[str, Any]] | None = Field(
        None, description="Pod topologySpreadConstraints (core/v1 objects) replacing the default spread of "
                          "multi-replica endpoints over nodes and zones; [] turns spreading off.",
        json_schema_extra={"items": {"type": "object", "x-kubernetes-preserve-unknown-fields": True}})


class ServiceSpec(_Model):
    type: Literal["ClusterIP", "NodePort", "LoadBalancer"] = Field("ClusterIP", description="Kubernetes Service type.")
    port: int = Field(8000, ge=1, le=65535, description="Service port (the runtime listens on 8000).")


class SecretKeyRef(_Model):
    name: str = Field(min_length=1, max_length=253, pattern=DNS_SUBDOMAIN,
                      description="Secret name in the endpoint's namespace.")
    key: str = Field("api-key", min_length=1, max_length=253, pattern=SECRET_KEY,
                     description="Key in the Secret holding the API key.")


class MonitoringSpec(_Model):
    pod_monitor: bool = Field(True, description="Create a PodMonitor when the monitoring.coreos.com CRDs exist.")


class NetworkPolicySpec(_Model):
    enabled: bool | None = Field(
        None, description="Create a NetworkPolicy that admits to the runtime's port only the endpoint's namespace, "
                          "Prometheus and the operator (plus ingressFrom); unset: the operator's default (the "
                          "chart's networkPolicy.enabled).")
    ingress_from: list[dict[str, Any]] | None = Field(
        None, description="More allowed peers (core NetworkPolicyPeer objects: podSelector, namespaceSelector, "
                          "ipBlock), e.g. a gateway's namespace.",
        json_schema_extra={"items": {"type": "object", "x-kubernetes-preserve-unknown-fields": True}})


_DP_TP_ABOVE_NODE = ("overrides.dataParallelSize x overrides.tensorParallelSize must be <= accelerator.gpusPerNode "
                     "(one pod per replica)")


class DSV4EndpointSpec(_Model):
    model_config = ConfigDict(json_schema_extra={"x-kubernetes-validations": [
        _cel("!has(self.overrides) || !has(self.overrides.tensorParallelSize) "
             "|| self.overrides.tensorParallelSize <= self.accelerator.gpusPerNode",
             "overrides.tensorParallelSize must be <= accelerator.gpusPerNode (one pod per replica)"),
        _cel("!has(self.overrides) || !has(self.overrides.dataParallelSize) "
             "|| self.overrides.dataParallelSize <= self.accelerator.gpusPerNode",
             "overrides.dataParallelSize must be <= accelerator.gpusPerNode (one pod per replica)"),
        _cel("!has(self.overrides) || !has(self.overrides.dataParallelSize) "
             "|| !has(self.overrides.tensorParallelSize) "
             "|| self.overrides.dataParallelSize * self.overrides.tensorParallelSize <= self.accelerator.gpusPerNode",
             _DP_TP_ABOVE_NODE),
    ]})
    model: ModelSpec = Field(description="The model to serve and where its weights are.")
    profile: ProfileSpec = Field(description="The workload the endpoint is planned for.")
    accelerator: AcceleratorSpec = Field(default_factory=AcceleratorSpec, description="The GPUs the pods run on.",
                                       json_schema_extra={"default": AcceleratorSpec().wire()})
    overrides: Overrides | None = Field(None, description="Settings that replace the planner's choices.")
    replicas: int | None = Field(None, ge=0, le=1000,
                                 description="Replicas (the /scale target). Without autoscaling: set by you, "
                                             "`kubectl scale` or an HPA (absent: the plan's count, written here by "
                                             "the operator). With autoscaling: the autoscaler's decision, mirrored "
                                             "by the operator; other changes are refused.")
    autoscaling: AutoscalingSpec | None = Field(None, description="Autoscaling on cache occupancy and queue depth.")
    placement: PlacementSpec | None = Field(None, description="Where the pods may run.")
    image: str | None = Field(None, min_length=1, max_length=1024, pattern=r"^\S+$",
                              description="Container image of the dsv4 runtime; defaults to the operator's "
                                          "runtime image (env DSV4_RUNTIME_IMAGE).")
    image_pull_policy: Literal["Always", "IfNotPresent", "Never"] = Field("IfNotPresent",
                                                                         description="Image pull policy.")
    service: ServiceSpec = Field(default_factory=ServiceSpec, description="The endpoint's Service.",
                                json_schema_extra={"default": ServiceSpec().wire()})
    api_key_secret: SecretKeyRef | None = Field(None, description="Secret holding the API key clients must send.")
    monitoring: MonitoringSpec = Field(default_factory=MonitoringSpec, description="Prometheus Operator integration.",
                                      json_schema_extra={"default": MonitoringSpec().wire()})
    network_policy: NetworkPolicySpec | None = Field(None, description="Opt-in NetworkPolicy for the runtime's API.")
    termination_grace_period_seconds: int = Field(
        120, ge=20, le=3600, description="Time a pod gets to drain running requests before it is killed "
                                         "(covers the 10 s preStop pause; at least 20).")

    @model_validator(mode="after")
    def _rules(self) -> DSV4EndpointSpec:
        tp = self.overrides.tensor_parallel_size if self.overrides else None
        if tp is not None and tp > self.accelerator.gpus_per_node:
            raise ValueError(f"overrides.tensorParallelSize ({tp}) must be <= accelerator.gpusPerNode "
                             f"({self.accelerator.gpus_per_node}) (one pod per replica)")
        dp = self.overrides.data_parallel_size if self.overrides else None
        if dp is not None and dp > self.accelerator.gpus_per_node:
            raise ValueError(f"overrides.dataParallelSize ({dp}) must be <= accelerator.gpusPerNode "
                             f"({self.accelerator.gpus_per_node}) (one pod per replica)")
        if dp is not None and tp is not None and dp * tp > self.accelerator.gpus_per_node:
            raise ValueError(f"{_DP_TP_ABOVE_NODE}: {dp} x {tp} > {self.accelerator.gpus_per_node}")
        return self

    @property
    def builtin_autoscaling(self) -> bool:
        return bool(self.autoscaling and self.autoscaling.enabled and self.autoscaling.mode == "builtin")

    @property
    def keda_autoscaling(self) -> bool:
        return bool(self.autoscaling and self.autoscaling.enabled and self.autoscaling.mode == "keda")


# ---------------------------------------------------------------------------------------------
# status
# ---------------------------------------------------------------------------------------------
class Condition(_Model):
    type: str = Field(description="Ready, Progressing, Degraded or PlanValid.")
    status: Literal["True", "False", "Unknown"] = Field(description="True, False or Unknown.")
    reason: str = Field(description="CamelCase reason.")
    message: str = Field("", description="Human-readable detail.")
    last_transition_time: str = Field(description="When status last changed (RFC 3339).")
    observed_generation: int | None = Field(None, description="metadata.generation the condition was computed for.")


class PlanStatus(_Model):
    layout: Layout = Field("tp", description="tp: one tensor-parallel group with one KV cache; dp-ep: "
                                             "dataParallelSize attention ranks of tensorParallelSize GPUs, each "
                                             "rank with its own KV cache, the routed experts split over all GPUs.")
    parallelism: str = Field("", description="The layout in one word (TP8, DP8+EP, DP2xTP4+EP), for the printer "
                                             "column.")
    tensor_parallel_size: int = Field(description="Tensor-parallel ranks: GPUs per replica with layout tp, GPUs "
                                                  "of each data-parallel rank with layout dp-ep.")
    data_parallel_size: int = Field(1, description="Data-parallel attention ranks (layout dp-ep; GPUs per replica = "
                                                   "dataParallelSize x tensorParallelSize).")
    batching_delay_ms: float = Field(description="Scheduler batching delay, milliseconds.")
    max_num_batched_tokens: int = Field(description="Token budget of one scheduler step.")
    chunked_prefill_size: int = Field(description="Largest prefill chunk of one request per step.")
    cache_policy: str = Field(description="Sliding-window cache policy.")
    hca_state: str = Field("raw", description="HCA compressor state: raw or online.")
    pool_split: dict[str, float] = Field(description="Fraction of the cache budget per pool.")
    cache_bytes_per_gpu: int = Field(description="Bytes per GPU left for the KV cache after weights and overhead "
                                                 "(one rank's pools).")
    max_servable_context: int = Field(description="Longest context one request can have on one replica.")
    max_model_len: int = Field(description="Longest context the runtime accepts (the profile's range).")
    sessions_per_replica: int = Field(description="Concurrent sessions of the profile one replica holds (all its "
                                                  "data-parallel ranks together).")
    initial_replicas: int = Field(description="Replicas the plan starts with.")
    weight_bytes: int = Field(description="Bytes of weights at the chosen quantization.")
    context_length_range: str = Field(description="Router label value: the context range the pods serve.")
    reasons: dict[str, str] = Field(description="One-line reason per choice.")


class ScalingDecision(_Model):
    time: str = Field(description="When the decision was taken (RFC 3339).")
    from_replicas: int = Field(description="Replicas before.")
    to_replicas: int = Field(description="Replicas after.")
    reason: str = Field(description="Why.")


def rfc3339(t: float, ms: bool = False) -> str:
    """A unix time as RFC 3339 UTC, whole seconds (conditions, history) or with milliseconds (autoscaler state,
    read back by `parse_rfc3339`)."""
    return dt.datetime.fromtimestamp(t, dt.UTC).isoformat(timespec="milliseconds" if ms else "seconds").replace(
        "+00:00", "Z")


def parse_rfc3339(text: str) -> float:
    return dt.datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()


class Recommendation(_Model):
    time: str = Field(description="When the autoscaler recommended it (RFC 3339).")
    replicas: int = Field(description="Recommended replicas.")


class AutoscalerState(_Model):
    recommendations: list[Recommendation] = Field(
        default_factory=list, description="Recent recommendations, kept for scale-down stabilization.")
    panic_until: str | None = Field(None, description="When the panic mode ends (RFC 3339).")

    @model_validator(mode="before")
    @classmethod
    def _from_epoch(cls, data: Any) -> Any:
        """Status written by older operators kept unix times ([time, replicas] pairs, a float panicUntil)."""
        if not isinstance(data, dict):
            return data
        data = dict(data)
        recs = data.get("recommendations") or []
        data["recommendations"] = [{"time": rfc3339(float(r[0]), ms=True), "replicas": int(r[1])}
                                   if isinstance(r, list | tuple) else r for r in recs]
        key = "panicUntil" if "panicUntil" in data else "panic_until"
        if isinstance(data.get(key), int | float):
            data[key] = rfc3339(float(data[key]), ms=True)
        return data


class PlanChange(_Model):
    time: str = Field(description="When the plan changed (RFC 3339).")
    observed_generation: int | None = Field(None, description="metadata.generation that caused the replan.")
    changes: list[str] = Field(description="Each changed choice as `name: old -> new`.")


class DSV4EndpointStatus(_Model):
    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, extra="ignore")
    observed_generation: int | None = Field(None, description="metadata.generation last reconciled.")
    conditions: list[Condition] = Field(default_factory=list, description="Ready, Progressing, Degraded, PlanValid.")
    replicas: int | None = Field(None, description="Pods of the endpoint (the /scale status replicas).")
    ready_replicas: int | None = Field(None, description="Pods that are ready.")
    desired_replicas: int | None = Field(None, description="Replicas the operator wants.")
    selector: str | None = Field(None, description="Label selector of the pods (the /scale selector).")
    endpoint: str | None = Field(None, description="In-cluster URL of the OpenAI-compatible API.")
    replica_counts: str | None = Field(None, description="Ready / desired replicas, e.g. 1/2 (a printer column).")
    reason: str | None = Field(None, description="Why the endpoint is degraded or its plan invalid (the condition's "
                                                 "reason); empty when healthy.")
    plan_summary: str | None = Field(None, description="The plan in one line (TP, cache policy, sessions, context).")
    plan: PlanStatus | None = Field(None, description="What the planner chose, with reasons.")
    pool_occupancy: dict[str, float] | None = Field(None, description="Mean occupancy per cache pool over ready pods.")
    max_cache_occupancy: str | None = Field(None, description="Fullest pool and its occupancy, e.g. csa=0.72.")
    queue_depth: float | None = Field(None, description="Mean waiting requests per ready pod.")
    scaling_history: list[ScalingDecision] = Field(default_factory=list, max_length=MAX_SCALING_HISTORY,
                                                   description="The last five scaling decisions.")
    plan_history: list[PlanChange] = Field(default_factory=list, max_length=MAX_PLAN_HISTORY,
                                           description="The last five replans, old -> new per changed choice.")
    autoscaler: AutoscalerState | None = Field(None, description="Autoscaler memory kept across operator restarts.")


class DSV4Endpoint(_Model):
    """The custom resource as a whole (for schema generation and parsing manifests)."""

    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, extra="ignore")
    api_version: Literal["serving.dsv4.dev/v1alpha1"] = Field(API_VERSION, description="serving.dsv4.dev/v1alpha1")
    kind: Literal["DSV4Endpoint"] = Field(KIND, description="DSV4Endpoint")
    metadata: dict[str, Any] = Field(default_factory=dict, description="Standard object metadata.")
    spec: DSV4EndpointSpec = Field(description="What to serve, for which workload, on which GPUs.")
    status: DSV4EndpointStatus | None = Field(None, description="What the operator observed and decided.")

    @model_validator(mode="after")
    def _name(self) -> DSV4Endpoint:
        name = self.metadata.get("name")
        problem = name_problem(name) if isinstance(name, str) else None
        if problem:
            raise ValueError(problem)
        return self


def parse_spec(spec: dict[str, Any]) -> DSV4EndpointSpec:
    """Validate a custom object's spec; raises pydantic.ValidationError naming the field."""
    return DSV4EndpointSpec.model_validate(spec)


def format_validation_error(err: Exception) -> str:
    """One line per problem: `spec.profile.custom.contextP95: ...`."""
    errors = getattr(err, "errors", None)
    if not callable(errors):
        return str(err)
    parts = []
    for e in errors():
        loc = ".".join(str(x) for x in e.get("loc", ()) if x != "__root__")
        msg = e.get("msg", "").removeprefix("Value error, ")
        parts.append(f"spec.{loc}: {msg}" if loc else f"spec: {msg}")
    return "; ".join(parts)
