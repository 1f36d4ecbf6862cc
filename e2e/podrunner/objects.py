"""ConfigMaps and Secrets a pod reads (volumes, envFrom, env valueFrom), as key -> bytes."""

from __future__ import annotations

import base64


class ObjectReader:
    def __init__(self, core):  # a kubernetes.client.CoreV1Api
        self.core = core

    def configmap_data(self, namespace: str, src: dict) -> dict[str, bytes]:
        from kubernetes.client.exceptions import ApiException

        try:
            cm = self.core.read_namespaced_config_map(src["name"], namespace)
        except ApiException as exc:
            if exc.status == 404 and src.get("optional"):
                return {}
            raise RuntimeError(f"configMap {namespace}/{src['name']} is not readable ({exc.status})") from exc
        data = {k: v.encode() for k, v in (cm.data or {}).items()}
        data.update({k: base64.b64decode(v) for k, v in (cm.binary_data or {}).items()})
        return data

    def secret_data(self, namespace: str, name: str | None, optional: bool | None) -> dict[str, bytes]:
        from kubernetes.client.exceptions import ApiException

        try:
            sec = self.core.read_namespaced_secret(name, namespace)
        except ApiException as exc:
            if exc.status == 404 and optional:
                return {}
            raise RuntimeError(f"secret {namespace}/{name} is not readable ({exc.status})") from exc
        return {k: base64.b64decode(v) for k, v in (sec.data or {}).items()}
