"""Long-running consumers of a namespace's events: the history materialiser, audit export, webhooks.

Each consumer is a worker on durable JetStream pull consumers (``botwire consume NAME``), so it
resumes where it stopped after a crash or a restart; delivery is at least once and each worker
makes a redelivered event change nothing twice (see each module). SIGTERM stops a worker
gracefully: the batch in hand is finished and acknowledged, then it exits 0.
``botwire consume status`` shows every consumer's lag (pending, ack floor, last activity).

Runtime choice: plain nats-py, not FastStream. nats-py is already the project's client and gives
what a worker needs directly: durable pull consumers (``pull_subscribe(durable=)`` + ``fetch``),
ack/nak/term, redelivery after ``ack_wait``, and the consumer's ack floor and pending counts for
lag. FastStream wraps the same client behind a subscriber/decorator model and would add a
dependency (it is not in this environment's package set) for AsyncAPI documents we have no use
for; its graceful shutdown is a few lines here (a SIGTERM handler and a loop that ends between
batches, ``runtime.run``). The workers also need stream-level reads (batch direct gets, purges)
that only the project's own ``Connection`` offers.

This package may import ``botwire_stream`` (its cores and ``nats/``); ``botwire_stream`` never
imports it (the CLI's ``consume`` group imports it when run).
"""

__all__: list[str] = []
