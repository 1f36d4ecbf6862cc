"""Certificates and kubeconfigs for the local control plane, made with the `openssl` command line.

One CA signs: the apiserver's serving certificate (SANs 127.0.0.1, localhost, the first service IP,
the in-cluster DNS names) and one client certificate per identity. Kubernetes takes a client's user
name from the certificate's CN and its groups from O, so:

| file stem | CN | O | used by |
|---|---|---|---|
| admin | dsv4-admin | system:masters | tests, CLI, kwok, the pod runner |
| controller-manager | system:kube-controller-manager | - | kube-controller-manager |
| scheduler | system:kube-scheduler | - | kube-scheduler |

A second CA (front-proxy) signs the apiserver's aggregation-layer client, so aggregated APIs
(prometheus-adapter) can be added later. The service-account key pair is RSA 2048.
"""

from __future__ import annotations

import base64
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

import yaml

CLIENTS: dict[str, tuple[str, str | None]] = {
    "admin": ("dsv4-admin", "system:masters"),
    "controller-manager": ("system:kube-controller-manager", None),
    "scheduler": ("system:kube-scheduler", None),
}
SERVER_DNS = ("localhost", "kubernetes", "kubernetes.default", "kubernetes.default.svc",
              "kubernetes.default.svc.cluster.local")


class CertError(RuntimeError):
    """openssl failed; the message carries the command and its output."""


@dataclass(frozen=True)
class CertPaths:
    dir: Path

    def crt(self, stem: str) -> Path:
        return self.dir / f"{stem}.crt"

    def key(self, stem: str) -> Path:
        return self.dir / f"{stem}.key"

    @property
    def sa_key(self) -> Path:
        return self.dir / "sa.key"

    @property
    def sa_pub(self) -> Path:
        return self.dir / "sa.pub"


def _openssl(*args: str, cwd: Path) -> None:
    exe = shutil.which("openssl")
    if exe is None:
        raise CertError("the `openssl` command is not installed (apt-get install openssl)")
    proc = subprocess.run([exe, *args], cwd=cwd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise CertError(f"openssl {' '.join(args)} failed: {proc.stderr.strip()[-2000:]}")


def _make_ca(d: Path, stem: str, cn: str) -> None:
    _openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", f"{stem}.key", "-out", f"{stem}.crt",
             "-days", "365", "-subj", f"/CN={cn}",
             "-addext", "basicConstraints=critical,CA:TRUE",
             "-addext", "keyUsage=critical,keyCertSign,cRLSign,digitalSignature", cwd=d)


def _make_leaf(d: Path, ca: str, stem: str, cn: str, org: str | None, *, server_sans: list[str] | None = None) -> None:
    subj = (f"/O={org}" if org else "") + f"/CN={cn}"
    _openssl("req", "-new", "-newkey", "rsa:2048", "-nodes", "-keyout", f"{stem}.key", "-out", f"{stem}.csr",
             "-subj", subj, cwd=d)
    ext = ["basicConstraints=CA:FALSE", "keyUsage=critical,digitalSignature,keyEncipherment"]
    if server_sans is not None:
        ext += ["extendedKeyUsage=serverAuth,clientAuth", "subjectAltName=" + ",".join(server_sans)]
    else:
        ext += ["extendedKeyUsage=clientAuth"]
    (d / f"{stem}.ext").write_text("\n".join(ext) + "\n")
    _openssl("x509", "-req", "-in", f"{stem}.csr", "-CA", f"{ca}.crt", "-CAkey", f"{ca}.key", "-CAcreateserial",
             "-out", f"{stem}.crt", "-days", "365", "-extfile", f"{stem}.ext", cwd=d)
    (d / f"{stem}.csr").unlink()
    (d / f"{stem}.ext").unlink()


def generate(d: Path, *, service_ip: str, extra_ips: tuple[str, ...] = ()) -> CertPaths:
    """Write every certificate and key into D (created; existing files are replaced)."""
    d.mkdir(parents=True, exist_ok=True)
    _make_ca(d, "ca", "dsv4-local-ca")
    _make_ca(d, "front-proxy-ca", "dsv4-front-proxy-ca")
    sans = [f"IP:{ip}" for ip in ("127.0.0.1", service_ip, *extra_ips)] + [f"DNS:{n}" for n in SERVER_DNS]
    _make_leaf(d, "ca", "apiserver", "kube-apiserver", None, server_sans=sans)
    _make_leaf(d, "ca", "kubelet", "dsv4-kubelet", None, server_sans=["IP:127.0.0.1"])  # the pod runner's API
    for stem, (cn, org) in CLIENTS.items():
        _make_leaf(d, "ca", stem, cn, org)
    _make_leaf(d, "front-proxy-ca", "front-proxy-client", "front-proxy-client", None)
    _openssl("genrsa", "-out", "sa.key", "2048", cwd=d)
    _openssl("rsa", "-in", "sa.key", "-pubout", "-out", "sa.pub", cwd=d)
    for p in d.iterdir():
        if p.suffix == ".key":
            p.chmod(0o600)
    return CertPaths(d)


def kubeconfig(server: str, ca: Path, crt: Path, key: Path, *, user: str, cluster: str = "dsv4-local") -> str:
    """A kubeconfig with the certificates embedded, so it can be copied anywhere."""
    def b64(p: Path) -> str:
        return base64.b64encode(p.read_bytes()).decode()

    doc = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": cluster, "cluster": {"server": server, "certificate-authority-data": b64(ca)}}],
        "users": [{"name": user, "user": {"client-certificate-data": b64(crt), "client-key-data": b64(key)}}],
        "contexts": [{"name": cluster, "context": {"cluster": cluster, "user": user}}],
        "current-context": cluster,
        "preferences": {},
    }
    return yaml.safe_dump(doc, sort_keys=False)
