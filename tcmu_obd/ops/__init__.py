"""ops/: running tcmu-obd as a service (systemd readiness, metrics, status)."""
