"""The main job, end to end: a streaming chat whose memory outlives the process that streamed it.

Run ``python examples/chat_demo.py``. It starts (or reuses) the embedded server, then runs two
separate OS processes in turn:

1. "turn 1" streams a bot answer token by token, writing each finished turn to a ``ChatHistory``
   and a user profile to ``Memory``; then the process exits, as a web worker would.
2. "turn 2", a brand-new process (think: the next request landing on another server), is asked
   "what did I just say?" and answers from the shared memory, streaming again.

The model is a tiny stand-in that streams canned tokens, so the demo needs no API key.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator

from botwire_stream import ChatHistory, Memory

NAMESPACE = "chat-demo"


def fake_model(history: list[dict[str, str]]) -> Iterator[str]:
    """Stream an answer that depends on the conversation so far (a stand-in for an LLM)."""
    last = history[-1]["content"]
    if "what did i just say" in last.lower():
        earlier = [m["content"] for m in history[:-1] if m["role"] == "user"]
        answer = f'You said: "{earlier[-1]}"' if earlier else "You have not said anything yet."
    else:
        answer = f"Nice to meet you! I will remember that: {last}"
    for word in answer.split(" "):
        time.sleep(0.02)  # tokens arrive one by one, as from a streaming API
        yield word + " "


def turn(session: str, user_text: str) -> None:
    memory = Memory(NAMESPACE)
    chat = ChatHistory(session, namespace=NAMESPACE, ttl=3600)
    chat.append({"role": "user", "content": user_text})
    print(f"[pid {os.getpid()}] user: {user_text}")
    print(f"[pid {os.getpid()}] bot:  ", end="", flush=True)
    tokens = []
    for token in fake_model(chat.messages()):
        tokens.append(token)
        print(token, end="", flush=True)
    print()
    chat.append({"role": "assistant", "content": "".join(tokens).strip()})
    memory.update(f"user:{session}:turns", lambda n: n + 1, default=0)


def main() -> None:
    if len(sys.argv) == 4 and sys.argv[1] == "turn":
        turn(sys.argv[2], sys.argv[3])
        return
    session = "demo-" + uuid.uuid4().hex[:8]
    print(f"session {session}: two separate processes share one conversation\n")
    for text in ("My name is Ada and I like tea.", "What did I just say?"):
        subprocess.run([sys.executable, __file__, "turn", session, text], check=True)
        print()
    chat = ChatHistory(session, namespace=NAMESPACE)
    turns = Memory(NAMESPACE).get(f"user:{session}:turns")
    print(f"stored: {len(chat)} messages, {turns} turns; conversations in '{NAMESPACE}': "
          f"{len(ChatHistory.sessions(NAMESPACE, limit=None))}")
    print("the embedded server keeps running; `botwire nats status` shows it, `botwire nats stop` stops it")


if __name__ == "__main__":
    main()
