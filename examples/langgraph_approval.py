"""A LangGraph agent that stops for a human's approval and is resumed by another process.

Run ``python examples/langgraph_approval.py`` (``pip install 'botwire-stream[langgraph]'``). It uses
``BOTWIRE_URL`` when set, else the embedded server, and runs two separate OS processes in turn:

1. ``start``: the graph drafts an answer with a (fake) chat model, then stops at ``interrupt()``
   to ask for approval; its checkpoint is in NATS JetStream, and the process exits.
2. ``resume``: a brand-new process (think: the approval arrives hours later, on another server)
   finds the thread waiting, resumes it with the decision, and the graph sends the answer and
   records the decision in the long-term store.

The model is a stand-in with canned answers, so the example needs no API key.
"""

from __future__ import annotations

import subprocess
import sys
import uuid
from typing import Any

from langchain_core.language_models.fake_chat_models import FakeListChatModel
from langgraph.graph import END, START, MessagesState, StateGraph
from langgraph.runtime import Runtime
from langgraph.types import Command, interrupt

from botwire_stream.integrations.langgraph import BotWireSaver, BotWireStore

NAMESPACE = "langgraph-demo"


def build_graph() -> Any:
    model = FakeListChatModel(responses=["Draft: we refund order 42 in full."])

    def draft(state: MessagesState) -> dict[str, Any]:
        return {"messages": [model.invoke(state["messages"])]}

    def review(state: MessagesState) -> dict[str, Any]:
        decision = interrupt({"question": "Send this answer?", "draft": state["messages"][-1].content})
        return {"messages": [("human", f"Reviewer: {decision}")]}

    def send(state: MessagesState, runtime: Runtime) -> dict[str, Any]:
        assert runtime.store is not None
        runtime.store.put(("reviews", "order-42"), "decision", {"decision": state["messages"][-1].content})
        return {"messages": [("ai", "Done: order 42 was refunded.")]}

    builder = StateGraph(MessagesState)
    builder.add_node("draft", draft)
    builder.add_node("review", review)
    builder.add_node("send", send)
    builder.add_edge(START, "draft")
    builder.add_edge("draft", "review")
    builder.add_edge("review", "send")
    builder.add_edge("send", END)
    return builder.compile(checkpointer=BotWireSaver(NAMESPACE), store=BotWireStore(NAMESPACE))


def start(thread: str) -> None:
    graph = build_graph()
    out = graph.invoke(
        {"messages": [("human", "Can I get a refund for order 42?")]}, {"configurable": {"thread_id": thread}}
    )
    print(f"[start]  stopped for approval: {out['__interrupt__'][0].value}")


def resume(thread: str, decision: str) -> None:
    graph = build_graph()
    config = {"configurable": {"thread_id": thread}}
    waiting = graph.get_state(config)
    print(f"[resume] thread {thread} waits at {waiting.next} for: {waiting.interrupts[0].value['question']}")
    out = graph.invoke(Command(resume=decision), config)
    for message in out["messages"]:
        print(f"[resume]   {message.type}: {message.content}")
    print(f"[resume] stored: {graph.store.get(('reviews', 'order-42'), 'decision').value}")


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "start":
        start(sys.argv[2])
    elif len(sys.argv) > 1 and sys.argv[1] == "resume":
        resume(sys.argv[2], sys.argv[3])
    else:  # both steps, each in its own process
        thread = f"order-42-{uuid.uuid4().hex[:6]}"
        subprocess.run([sys.executable, __file__, "start", thread], check=True)
        subprocess.run([sys.executable, __file__, "resume", thread, "approved"], check=True)
