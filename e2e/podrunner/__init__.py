"""The pod runner: pods scheduled onto the kwok nodes are backed by real local processes.

kwok fakes the nodes (status, heartbeats, leases); it is configured with no pod stages, so this
package plays the kubelet for every pod bound to one of the managed nodes. One file per concern:

    runner.py     PodRunner: the pod watch, start/tick/terminate of each pod, status patches; `main`
    state.py      PodEntry / Container records and the crash-safe state file (`cleanup_recorded`)
    lifecycle.py  a container's process: spawn under `nsenter`, preStop hooks, stop
    paths.py      mountPath -> local directory mapping (there is no mount namespace)
    volumes.py    configMap / secret / projected / downwardAPI / emptyDir / hostPath volumes as files
    objects.py    reading ConfigMaps and Secrets from the API server
    env.py        env / envFrom / fieldRef / resourceFieldRef, `$(VAR)` expansion, the command line
    probes.py     readiness / liveness / startup probes (httpGet, tcpSocket, exec) and their thresholds
    restarts.py   restartPolicy, the kubelet's back-off, the last exit (`lastState.terminated` + last log line)
    status.py     the pod status a kubelet would report (phase, conditions, container statuses)
    kubelet_api.py  the kubelet's `/containerLogs` over HTTPS on loopback, for `kubectl logs [-f]`

Run: ``python -m dsv4.e2e.podrunner --kubeconfig K --work-dir D --node NAME=CIDR ...`` (the cluster
starts it); docs/local-cluster.md describes the behaviour.
"""
