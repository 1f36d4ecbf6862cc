"""`make demo` (`python -m dsv4.demo`): the operator on a local Kubernetes cluster, end to end.

Brings up the local control plane "demo" (builds it once, cached: docs/local-cluster.md), `helm install`s the
operator chart, runs the operator with the chart's ServiceAccount token, `kubectl apply`s the short-chat example
(e2e overlay: tiny model on the CPU), waits until it is Ready, sends a chat request with the `openai` client to
the endpoint's pod, prints the answer and `kubectl get dsv4ep`, starts Prometheus on the pods and the operator,
and says where the dashboards are. Everything keeps running until `make demo-down` (`--down`).

    python -m dsv4.demo [--prompt TEXT] [--max-tokens N] [--no-prometheus]
    python -m dsv4.demo --down          # stop the operator, Prometheus and the cluster
    python -m dsv4.demo --local [...]   # the in-process demo: one `dsv4 serve`, one request, no cluster
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

CLUSTER = "demo"
NAMESPACE = "default"
REPO = Path(__file__).resolve().parents[1]
EXAMPLE = REPO / "examples" / "e2e" / "short-chat.yaml"



def _print_message(message) -> None:
    """V4 answers in thinking mode by default: the reasoning comes apart from the answer (which a short
    max_tokens may not reach)."""
    reasoning = (message.model_extra or {}).get("reasoning_content")
    if reasoning:
        print(f"  reasoning: {reasoning!r}")
    print(f"  answer:    {message.content!r}")

def say(msg: str) -> None:
    print(f"dsv4 demo: {msg}", flush=True)


# ---- the in-process demo (no cluster) ------------------------------------------------------------------------
def run_local(args: argparse.Namespace) -> int:
    from dsv4.runtime.server.launch import start_server
    from openai import OpenAI

    t0 = time.monotonic()
    extra = ["--model", args.model] if args.model else []
    say("starting `dsv4 serve` on the built-in tiny model ...")
    server = start_server(extra, timeout=300)
    try:
        say(f"server ready at {server.base_url} in {time.monotonic() - t0:.1f} s")
        client = OpenAI(base_url=server.base_url + "/v1", api_key="not-needed")
        model = client.models.list().data[0].id
        say(f"model {model!r}; asking: {args.prompt!r}")
        t1 = time.monotonic()
        resp = client.chat.completions.create(
            model=model, messages=[{"role": "user", "content": args.prompt}], max_tokens=args.max_tokens,
            temperature=0.0)
        u = resp.usage
        say(f"answer ({u.completion_tokens} tokens in {time.monotonic() - t1:.2f} s, "
            f"finish_reason={resp.choices[0].finish_reason}; the tiny model has random weights, so the text "
            f"is gibberish):")
        _print_message(resp.choices[0].message)
        say(f"metrics at {server.base_url}/metrics")
        _, body = server.get("/metrics")
        for ln in body.decode().splitlines():
            if ln.startswith(("vllm:generation_tokens_total", "vllm:kv_cache_usage_perc", "vllm:num_requests_running")):
                print(f"  {ln}")
        if args.keep:
            say("server left running; Ctrl+C to stop")
            try:
                server.proc.wait()
            except KeyboardInterrupt:
                pass
    finally:
        say(f"server stopped (exit code {server.stop()})")
    return 0


# ---- the cluster demo ----------------------------------------------------------------------------------------
def _record_file() -> Path:
    from dsv4.e2e import cluster

    return cluster.state_root() / f"{CLUSTER}-demo.json"


def _wait(what: str, fn, timeout: float, every: float = 10.0):
    t0 = last = time.monotonic()
    while time.monotonic() - t0 < timeout:
        try:
            value = fn()
        except Exception:  # noqa: BLE001 - not yet
            value = None
        if value:
            return value
        if time.monotonic() - last >= every:
            say(f"  ... still waiting for {what} ({time.monotonic() - t0:.0f} s)")
            last = time.monotonic()
        time.sleep(0.5)
    raise TimeoutError(f"{what} not reached within {timeout:.0f} s")


def run_cluster(args: argparse.Namespace) -> int:
    from dsv4.e2e import build, cluster, opproc, procs, tools
    from dsv4.e2e.prom import Prometheus
    from kubernetes import client
    from openai import OpenAI

    t0 = time.monotonic()
    if why := cluster.podnet.available():
        say(f"the local cluster needs root and network namespaces: {why}. Try `python -m dsv4.demo --local`.")
        return 1
    if build.missing():
        say("building the control plane once (kube-apiserver, controller-manager, scheduler, etcd, kwok from Go "
            f"modules, cached in {build.k8s_dir()}; {build.COLD_BUILD_ESTIMATE}) ...")
    c = cluster.up(CLUSTER)
    say(f"cluster up ({time.monotonic() - t0:.0f} s): {c.server}, nodes {', '.join(c.nodes)}")
    t = tools.ensure_kubectl_helm()
    install = opproc.install_chart(c.kubeconfig)
    say(f"helm install {install.release} helm/dsv4-operator -n {install.namespace}: done (its Deployment "
        f"{install.deployment} is scaled to 0: here the operator runs as a local process, started next)")
    _wait("the DSV4Endpoint API", lambda: opproc.kubectl(["get", "dsv4ep", "-A"], c.kubeconfig, check=False)
          .returncode == 0, 60)

    records = json.loads(_record_file().read_text()) if _record_file().exists() else {}
    op_rec = procs.ProcRecord.from_dict(records["operator"]) if "operator" in records else None
    if op_rec is None or not procs.is_alive(op_rec):
        kcfg = opproc.service_account_kubeconfig(c.kubeconfig, install.namespace, install.service_account,
                                                 c.state_dir / "operator-sa.kubeconfig")
        op = opproc.OperatorProcess(kcfg, c.logs_dir / "operator.log", timer_interval_s=5.0).start()
        records["operator"] = op.rec.to_dict()
        records["operator_metrics"] = op.metrics_url
        _record_file().write_text(json.dumps(records))
        say(f"operator running as system:serviceaccount:{install.namespace}:{install.service_account} "
            f"(pid {op.rec.pid}, log {op.log})")
    else:
        say(f"operator already running (pid {op_rec.pid})")

    opproc.kubectl(["apply", "-n", NAMESPACE, "-f", str(EXAMPLE)], c.kubeconfig)
    say(f"kubectl apply -f {EXAMPLE.relative_to(REPO)}: endpoint 'chat' (tiny model on the CPU)")
    with c.api_client() as api:
        co, disc = client.CustomObjectsApi(api), client.DiscoveryV1Api(api)

        def ready_ip() -> str | None:
            ep = co.get_namespaced_custom_object("serving.dsv4.dev", "v1alpha1", NAMESPACE, "dsv4endpoints", "chat")
            if not any(x["type"] == "Ready" and x["status"] == "True" for x in ep.get("status", {}).get("conditions",
                                                                                                          [])):
                return None
            slices = disc.list_namespaced_endpoint_slice(NAMESPACE, label_selector="kubernetes.io/service-name=chat")
            ips = [a for s in slices.items for e in (s.endpoints or []) if e.conditions and e.conditions.ready
                   for a in e.addresses]
            return ips[0] if ips else None

        ip = _wait("the endpoint to be Ready (the runtime starts in ~30 s)", ready_ip, 300)
    say(f"endpoint Ready ({time.monotonic() - t0:.0f} s since start); pod at {ip}")
    oc = OpenAI(base_url=f"http://{ip}:8000/v1", api_key="unused", max_retries=0, timeout=120)
    model = oc.models.list().data[0].id
    say(f"asking {model!r}: {args.prompt!r}")
    r = oc.chat.completions.create(model=model, messages=[{"role": "user", "content": args.prompt}],
                                   max_tokens=args.max_tokens, temperature=0.0)
    say(f"answer ({r.usage.completion_tokens} tokens, finish_reason={r.choices[0].finish_reason}; random weights, "
        f"so gibberish):")
    _print_message(r.choices[0].message)
    print(opproc.kubectl(["get", "dsv4ep", "-n", NAMESPACE], c.kubeconfig).stdout.rstrip())

    if not args.no_prometheus and "prometheus" not in records:
        from dsv4.operator.observability import alerts

        try:
            prom = Prometheus.for_cluster(c, c.state_dir / "prometheus", operator_target=records[
                "operator_metrics"].removeprefix("http://").removesuffix("/metrics"),
                rules_text=alerts.rules_file_text(), interval="5s").start()
            records["prometheus"] = prom.rec.to_dict()
            records["prometheus-pod-sd"] = prom.sd_rec.to_dict()
            records["prometheus_url"] = prom.url
            _record_file().write_text(json.dumps(records))
        except Exception as e:  # noqa: BLE001 - the demo works without it
            say(f"Prometheus not started: {e}")
    print()
    say("where things are:")
    print(f"  export KUBECONFIG={c.kubeconfig}      # kubectl: {t.kubectl}")
    print(f"  chat endpoint:       http://{ip}:8000/v1  (metrics: http://{ip}:8000/metrics)")
    print(f"  operator metrics:    {records['operator_metrics']}")
    if "prometheus_url" in records:
        print(f"  Prometheus:          {records['prometheus_url']}  (try: dsv4_cache_pool_occupancy_ratio, "
              f"vllm:num_requests_running; alert rules loaded)")
    print(f"  Grafana dashboards:  {REPO / 'helm/dsv4-operator/dashboards'}/*.json, and as ConfigMaps labelled "
          f"grafana_dashboard=1 in namespace {install.namespace} (import into any Grafana on the Prometheus above)")
    print(f"  logs:                {c.logs_dir}  (operator.log, pods under {c.state_dir / 'pods'})")
    say("tear down with `make demo-down` (python -m dsv4.demo --down)")
    return 0


def failure_hints() -> list[str]:
    """Where to look after a failure: the endpoint's pod logs (with their last line), the components' logs."""
    from dsv4.e2e import cluster

    state = cluster.state_root() / CLUSTER
    logs = sorted((state / "pods").glob(f"{NAMESPACE}_chat-*/logs/*.log"), key=lambda p: -p.stat().st_mtime)
    out = []
    for log in logs[:3]:
        lines = [ln for ln in log.read_text(errors="replace").splitlines() if ln.strip()]
        out.append(f"pod log {log}" + (f": last line {lines[-1].strip()[:300]!r}" if lines else " (empty)"))
    if logs:
        out.append(f"or: KUBECONFIG={state / 'kubeconfig'} kubectl logs -n {NAMESPACE} deploy/chat")
    else:
        out.append(f"no pod of the endpoint has started (pod logs: {state / 'pods'}/<ns>_<pod>_<uid>/logs/)")
    out.append(f"operator and control-plane logs: {state / 'logs'}; `make demo-down` cleans up")
    return out


def run_down() -> int:
    from dsv4.e2e import cluster, procs

    f = _record_file()
    if f.exists():
        records = json.loads(f.read_text())
        for name in ("prometheus", "prometheus-pod-sd", "operator"):
            if name in records and procs.stop(procs.ProcRecord.from_dict(records[name]), grace_s=10.0):
                say(f"{name} stopped")
        f.unlink()
    stopped = cluster.down(CLUSTER)
    say(f"cluster {CLUSTER!r} down ({', '.join(stopped) if stopped else 'nothing was running'})")
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m dsv4.demo", description=__doc__.splitlines()[0])
    ap.add_argument("--local", action="store_true", help="in-process demo: one `dsv4 serve`, no cluster")
    ap.add_argument("--down", action="store_true", help="stop the cluster demo (operator, Prometheus, cluster)")
    ap.add_argument("--model", help="--local: checkpoint folder (default: the built-in tiny model)")
    ap.add_argument("--keep", action="store_true", help="--local: leave the server running until Ctrl+C")
    ap.add_argument("--no-prometheus", action="store_true", help="do not start Prometheus")
    ap.add_argument("--prompt", default="Hello! What does a KV cache hold?")
    ap.add_argument("--max-tokens", type=int, default=32)
    args = ap.parse_args(argv)
    if args.max_tokens < 1:
        ap.error(f"--max-tokens must be >= 1, got {args.max_tokens}")
    if args.down:
        return run_down()
    if args.local:
        return run_local(args)
    try:
        return run_cluster(args)
    except Exception as e:
        say(f"failed: {type(e).__name__}: {e}")
        for line in failure_hints():
            say(line)
        return 1


if __name__ == "__main__":
    sys.exit(main())
