"""Observability artefacts generated from code: Grafana dashboards, Prometheus alert rules, and the command
that writes them into the Helm chart (`dsv4 observability generate`).

Every PromQL expression here names only series from `dsv4.metrics_catalog`.
"""
