"""Expiry alerting: an exporter of certificate timestamps, the Prometheus rules (with promtool
tests) that page before a certificate takes the mesh down, and a cron-friendly checker that
evaluates the same thresholds without Prometheus and notifies Alertmanager or a webhook."""
