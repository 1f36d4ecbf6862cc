"""The local Kubernetes control plane used by the end-to-end tests and the demo."""
