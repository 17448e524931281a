"""Chaos and crash-safety scenarios for botwire-stream: ``python -m chaos`` (see ``scenarios``)."""
