"""Watching a running process: the HTTP endpoint, its metrics, systemd notifications."""
