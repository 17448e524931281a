"""``botwire serve``: the HTTP server (extra ``server``: Starlette on uvicorn).

It speaks the Durable Streams protocol at ``/v1/stream/<path>`` over ``botwire_stream.tokens``
(state only in NATS, so any number of serve processes share it) and serves every conversation
log read-only at ``/v1/stream/chat/<namespace>/<session>``. One module per concern: ``app``
(factory and lifecycle), ``streams`` (the protocol's routes), ``chat`` (conversations),
``protocol`` (request headers), ``headers`` (security and CORS), ``sse``, ``cursor``, ``run``.
The core never imports this package.
"""

from __future__ import annotations

__all__ = ["create_app", "serve"]


def __getattr__(name: str) -> object:
    if name == "create_app":
        from .app import create_app

        return create_app
    if name == "serve":
        from .run import serve

        return serve
    raise AttributeError(name)
