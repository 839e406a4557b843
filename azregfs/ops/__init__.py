"""For the operator: Prometheus metrics, the live monitor, logging set-up and the version."""
