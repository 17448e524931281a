"""LangGraph app processes for the tests: each run is a fresh OS process, like an app restart.

Run as ``python -m tests.langgraph_workers <command> <url> <namespace> ...`` from the repository
root; each command prints one JSON document on its last stdout line. The parent side is ``run``.

The graph (``build``): ``draft`` asks a fake chat model for a draft answer, ``review`` stops at
``interrupt()`` for a human decision, ``send`` asks the model for the final answer and records the
decision in the store (``runtime.store``), a long-term memory other threads can read.
"""

from __future__ import annotations

import asyncio
import json
import operator
import sys
import time
from pathlib import Path
from typing import Annotated, Any, TypedDict

from tests import procs


# -- parent side -----------------------------------------------------------------------------------
def run(*args: str, timeout: float = 60.0) -> Any:
    """Run one worker process to completion and return the JSON it printed last."""
    return procs.run("tests.langgraph_workers", args, timeout)


# -- child side ------------------------------------------------------------------------------------
class State(TypedDict):
    """The counter graph's state: a count and the steps seen (appended by every step)."""

    n: int
    seen: Annotated[list[str], operator.add]


class Counting:
    """A fake chat model with scripted answers that counts its calls."""

    def __init__(self, answers: list[str]) -> None:
        from langchain_core.language_models.fake_chat_models import FakeListChatModel

        self.model = FakeListChatModel(responses=answers)
        self.calls = 0

    def __call__(self, messages: list[Any]) -> Any:
        self.calls += 1
        return self.model.invoke(messages)


class Sending(Counting):
    """A fake chat model that sends what the conversation decided last: ``decision: X`` gives
    ``Sent: X`` (so a stored state whose answer disagrees with its decision is a mixed one)."""

    def __init__(self) -> None:
        super().__init__(["unused"])

    def __call__(self, messages: list[Any]) -> Any:
        from langchain_core.messages import AIMessage

        self.calls += 1
        return AIMessage(content="Sent: " + str(messages[-1].content).removeprefix("decision: "))


def build(url: str, namespace: str, drafter: Counting, sender: Counting) -> Any:
    from langgraph.graph import END, START, MessagesState, StateGraph
    from langgraph.runtime import Runtime
    from langgraph.types import interrupt

    from botwire_stream.integrations.langgraph import BotWireSaver, BotWireStore

    def draft(state: MessagesState) -> dict[str, Any]:
        return {"messages": [drafter(state["messages"])]}

    def review(state: MessagesState) -> dict[str, Any]:
        decision = interrupt({"draft": state["messages"][-1].content})
        return {"messages": [("human", f"decision: {decision}")]}

    def send(state: MessagesState, runtime: Runtime) -> dict[str, Any]:
        answer = sender(state["messages"])
        assert runtime.store is not None
        runtime.store.put(("decisions", "ada"), "refund-42", {"decision": state["messages"][-1].content})
        return {"messages": [answer]}

    builder = StateGraph(MessagesState)
    builder.add_node("draft", draft)
    builder.add_node("review", review)
    builder.add_node("send", send)
    builder.add_edge(START, "draft")
    builder.add_edge("draft", "review")
    builder.add_edge("review", "send")
    builder.add_edge("send", END)
    return builder.compile(checkpointer=BotWireSaver(namespace, url=url), store=BotWireStore(namespace, url=url))


def start(url: str, namespace: str, thread: str) -> Any:
    """Run the graph (sync face) until it stops at the review."""
    drafter, sender = Counting(["Draft: refund order 42 in full."]), Counting(["unused"])
    graph = build(url, namespace, drafter, sender)
    config = {"configurable": {"thread_id": thread}}
    out = graph.invoke({"messages": [("human", "Can I get a refund for order 42?")]}, config)
    return {
        "interrupts": [i.value for i in out["__interrupt__"]],
        "next": list(graph.get_state(config).next),
        "calls": [drafter.calls, sender.calls],
    }


async def resume(url: str, namespace: str, thread: str, decision: str) -> Any:
    """In a new process: find the stopped thread and resume it (async face) with ``decision``."""
    from langgraph.types import Command

    drafter, sender = Counting(["never asked"]), Counting(["Refund sent for order 42."])
    graph = build(url, namespace, drafter, sender)
    config = {"configurable": {"thread_id": thread}}
    before = await graph.aget_state(config)
    out = await graph.ainvoke(Command(resume=decision), config)
    after = await graph.aget_state(config)
    stored = await graph.store.aget(("decisions", "ada"), "refund-42")
    history = [s async for s in graph.aget_state_history(config)]
    return {
        "waiting": list(before.next),
        "pending": [i.value for i in before.interrupts],
        "messages": [[m.type, m.content] for m in out["messages"]],
        "next": list(after.next),
        "calls": [drafter.calls, sender.calls],
        "stored": stored.value if stored else None,
        "checkpoints": len(history),
    }


def counter_graph(url: str, namespace: str) -> Any:
    """A graph of ``steps`` increments, one checkpoint each (for the concurrency tests)."""
    from langgraph.graph import END, START, StateGraph

    from botwire_stream.integrations.langgraph import BotWireSaver

    def bump(state: State) -> dict[str, Any]:
        return {"n": state["n"] + 1, "seen": [f"step {state['n'] + 1}"]}

    def more(state: State) -> str:
        return "bump" if state["n"] < 5 else END

    builder = StateGraph(State)
    builder.add_node("bump", bump)
    builder.add_edge(START, "bump")
    builder.add_conditional_edges("bump", more)
    return builder.compile(checkpointer=BotWireSaver(namespace, url=url))


async def count_threads(url: str, namespace: str, prefix: str, n: str, go: str) -> Any:
    """Run ``n`` counter threads concurrently once ``go`` exists; their final states."""
    graph = counter_graph(url, namespace)
    print("ready", flush=True)
    deadline = time.monotonic() + 30
    while not Path(go).exists() and time.monotonic() < deadline:
        await asyncio.sleep(0.01)
    outs = await asyncio.gather(
        *(graph.ainvoke({"n": 0, "seen": []}, {"configurable": {"thread_id": f"{prefix}-{i}"}}) for i in range(int(n)))
    )
    return [o["n"] for o in outs]


def main(argv: list[str]) -> None:
    command, *args = argv
    if command == "start":
        out = start(*args)
    elif command == "resume":
        out = asyncio.run(resume(*args))
    elif command == "count-threads":
        out = asyncio.run(count_threads(*args))
    else:
        raise SystemExit(f"unknown command {command!r}")
    print(json.dumps(out))


if __name__ == "__main__":
    main(sys.argv[1:])
