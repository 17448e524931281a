"""The NATS transport: the ``_backend`` protocols over nats-server, and nothing the cores need to know.

Modules, each importing only those listed before it (never upward, never the cores):
``embedded`` (the embedded nats-server), ``errors`` (NATS failures -> ``botwire_stream.errors``),
``replies`` (reply routing on nats-py's subscription hook), ``connect`` (opening a verified
client), ``retry`` (one deadline per call, re-sends, recovery through a ``ServerRestart`` hook),
``restart`` (that hook for the embedded server), ``jetstream`` (the raw JetStream API with typed
responses: the ``Connection``), ``pool`` (opening connections, one shared connection per event
loop), ``feeds`` (watches that resume after reconnects), ``blobs`` and ``kv`` (``MemoryBackend``),
``chatlog`` (``ChatBackend``).
"""

__all__: list[str] = []
