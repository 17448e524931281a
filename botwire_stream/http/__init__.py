"""The HTTP transport: ``_backend``'s protocols over the REST API of ``botwire serve``
(``url="http://host:port"``), with httpx. Chosen by ``_backend.open_memory``/``open_chat`` for
``http://`` and ``https://`` URLs; the cores above are the same as over NATS, and so are the
errors (the server sends each error's ``code``; ``client.raise_for`` maps it back to its class).
"""

__all__: list[str] = []
