"""The loopback TCP relay of the fault tests: ``chaos.proxy.Proxy`` (stall, resume, cut, refuse,
and lost replies: ``drop``, ``trigger``, ``cut_at``), under the name the tests use."""

from __future__ import annotations

from chaos.proxy import Proxy as Relay

__all__ = ["Relay"]
