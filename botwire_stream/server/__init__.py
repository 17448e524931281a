"""``botwire serve``: the HTTP server (extra ``server``: Starlette on uvicorn).

It speaks the Durable Streams protocol at ``/v1/stream/<path>`` over ``botwire_stream.tokens``
(state only in NATS, so any number of serve processes share it) and serves every conversation
log read-only at ``/v1/stream/chat/<namespace>/<session>``. One module per concern: ``app``
(factory and lifecycle), ``streams`` (the protocol's routes), ``chat`` (conversations),
``protocol`` (request headers), ``headers`` (security and CORS), ``sse``, ``cursor``, ``run``.
The core never imports this package.
"""

from __future__ import annotations

__all__ = ["NATS_TIMEOUT", "create_app", "serve"]

# Each NATS call a request makes may take this long, retried within it by the library, so that a
# request arriving during a stream leader's election waits for the new leader rather than
# answering 503 (with the library's default 5 s it did: tests/test_cluster_compose.py). nats-server
# elects a new leader 4-9 s after the old one died (its Raft election timeout, fixed in the
# server; measured 6.2-7.9 s on a loaded machine by `python -m chaos --only cluster --kills 8`).
NATS_TIMEOUT = 15.0


def __getattr__(name: str) -> object:
    if name == "create_app":
        from .app import create_app

        return create_app
    if name == "serve":
        from .run import serve

        return serve
    raise AttributeError(name)
