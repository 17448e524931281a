"""LangChain app processes for the tests: each run is a fresh OS process, like an app restart.

Run as ``python -m tests.langchain_workers <command> <url> <namespace> <session> ...`` from the
repository root; each command prints one JSON document on its last stdout line. The parent side
is ``run``.
"""

from __future__ import annotations

import json
import sys
import warnings
from typing import Any

from tests import procs

ROOT = procs.ROOT


# -- parent side -----------------------------------------------------------------------------------
def run(*args: str, timeout: float = 60.0) -> Any:
    """Run one worker process to completion and return the JSON it printed last."""
    return procs.run("tests.langchain_workers", args, timeout)


# -- child side ------------------------------------------------------------------------------------
def read_history(url: str, namespace: str, session: str) -> Any:
    """The session's messages as ``[class name, type, content]``."""
    from botwire_stream.integrations.langchain import BotWireChatHistory

    with BotWireChatHistory(session, namespace=namespace, url=url) as history:
        return [[type(m).__name__, m.type, m.content] for m in history.messages]


def classic_turn(url: str, namespace: str, session: str, user_input: str, reply: str) -> Any:
    """One turn of a langchain-classic ``ConversationChain`` whose memory is a BotWireChatHistory.

    Returns the prompt the LLM was given (which holds the remembered conversation) and the
    memory's messages after the turn.
    """
    from langchain_classic.chains import ConversationChain
    from langchain_classic.memory import ConversationBufferMemory
    from langchain_core.callbacks import BaseCallbackHandler
    from langchain_core.language_models.fake import FakeListLLM

    from botwire_stream.integrations.langchain import BotWireChatHistory

    recorded: list[str] = []

    class Recorder(BaseCallbackHandler):
        def on_llm_start(self, serialized: dict[str, Any], prompts: list[str], **kwargs: Any) -> None:
            recorded.extend(prompts)

    history = BotWireChatHistory(session, namespace=namespace, url=url)
    memory = ConversationBufferMemory(chat_memory=history)
    chain = ConversationChain(llm=FakeListLLM(responses=[reply]), memory=memory)
    result = chain.invoke({"input": user_input}, config={"callbacks": [Recorder()]})
    after = [[m.type, m.content] for m in memory.chat_memory.messages]
    history.close()
    return {"response": result["response"], "prompt": recorded[0], "messages": after}


def main(argv: list[str]) -> None:
    from langchain_core._api.deprecation import LangChainDeprecationWarning

    warnings.simplefilter("ignore", LangChainDeprecationWarning)  # the legacy classes are used on purpose
    command, *args = argv
    if command == "read-history":
        out = read_history(*args)
    elif command == "classic-turn":
        out = classic_turn(*args)
    else:
        raise SystemExit(f"unknown command {command!r}")
    print(json.dumps(out), flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
