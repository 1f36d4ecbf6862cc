"""Who owns the replica count (`Deployment.spec.replicas`), and what happens when someone else writes it (pure).

- builtin autoscaling: the operator's autoscaler owns them (`status.desiredReplicas`); a
  `kubectl scale deployment/<ep>` is reverted on the next reconcile, with a Warning event `ReplicasReverted`.
- KEDA (`autoscaling.mode: keda`): KEDA's HPA owns them (the operator omits `replicas` from its apply);
  a manual scale is left to the HPA, which reverts it itself.
- otherwise: `spec.replicas` owns them (writable through the `/scale` subresource), else the plan's
  initial replicas; a manual scale of the Deployment is reverted, with a Warning event `ReplicasReverted`.

`spec.replicas` itself is always present, so `/scale` always answers (`spec_replicas_to_write`): under
autoscaling it mirrors the decision (other writers are refused by CEL); otherwise the operator fills it once.

The operator never adopts a child's replicas into the endpoint's spec: a controller writing its own
spec fights the user's `kubectl apply`. The supported ways to change replicas are `kubectl scale
dsv4ep/<ep> --replicas=N` (spec.replicas, also what an HPA on `/scale` writes) or the autoscaling bounds.
Server-side apply with `force` takes the field back from the other manager (`kubectl` is field manager
`kubectl-scale`), so the revert is the ordinary apply of the next reconcile (at most one timer interval).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from dsv4.operator.api import DSV4EndpointSpec

Owner = Literal["autoscaler", "keda", "spec", "plan"]


def replicas_owner(spec: DSV4EndpointSpec) -> Owner:
    if spec.keda_autoscaling:
        return "keda"
    if spec.builtin_autoscaling:
        return "autoscaler"
    return "spec" if spec.replicas is not None else "plan"


def _deployment_replicas(deployment: dict[str, Any] | None) -> int | None:
    r = ((deployment or {}).get("spec") or {}).get("replicas")
    return None if r is None else int(r)


def foreign_scale_event(name: str, spec: DSV4EndpointSpec, written: int | None, last_written: int | None,
                        deployment: dict[str, Any] | None) -> tuple[str, str, str] | None:
    """A Warning event when the Deployment's replicas were changed by someone other than the operator.

    `written`: what this reconcile applies (None: KEDA owns it); `last_written`: what the previous
    reconcile applied (status.desiredReplicas); `deployment`: the Deployment as read before this apply.
    A difference between the Deployment and `last_written` means another writer; the apply reverts it.
    """
    observed = _deployment_replicas(deployment)
    if written is None or last_written is None or observed is None or observed == last_written:
        return None
    owner = replicas_owner(spec)
    if owner == "autoscaler":
        how = ("the built-in autoscaler owns replicas; to change them set autoscaling.minReplicas/maxReplicas, "
               f"or disable autoscaling and run `kubectl scale dsv4ep/{name} --replicas=N`")
    else:
        how = (f"spec.replicas owns them; run `kubectl scale dsv4ep/{name} --replicas=N` "
               "(the endpoint's /scale subresource) instead")
    return ("Warning", "ReplicasReverted",
            f"Deployment {name} was scaled to {observed} outside the operator; reverting to {written}: {how}")


def autoscaler_current(status_desired: int | None, deployment: dict[str, Any] | None, min_replicas: int) -> int:
    """The replica count the autoscaler decides from: its own last decision, not the Deployment's value
    (which a foreign writer may have changed), so a manual scale is never adopted as the new baseline."""
    if status_desired is not None:
        return int(status_desired)
    observed = _deployment_replicas(deployment)
    return observed if observed is not None else min_replicas


@dataclass(frozen=True)
class ScaleWrite:
    """A write of `spec.replicas` through `/scale`."""

    replicas: int
    only_if_absent: bool  # the fill of a fixed-mode endpoint: never over a value someone set since we looked


def spec_replicas_to_write(spec: DSV4EndpointSpec, desired: int) -> ScaleWrite | None:
    """What the operator writes to `spec.replicas` (through `/scale`) so `GET .../scale` always answers, or None.

    With autoscaling (builtin or KEDA) `spec.replicas` mirrors `desired`, the replica count the autoscaler chose
    (a CEL transition rule refuses any other change). Without, it is the user's; when absent the operator writes
    the plan's count once, after which it is the user's like any other value."""
    if spec.autoscaling is not None and spec.autoscaling.enabled:
        return None if spec.replicas == desired else ScaleWrite(desired, only_if_absent=False)
    return ScaleWrite(desired, only_if_absent=True) if spec.replicas is None else None
