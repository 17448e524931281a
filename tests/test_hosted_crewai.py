"""The hosted product's client (``botwire`` 0.2.1): its CrewAI ``memory_tools`` against
``botwire serve``, used as its users do (``BOTWIRE_URL``, the tools given to an Agent).

What we found, with crewai-tools 1.x: ``memory_tools`` imports ``tool`` from ``crewai_tools``, which
no longer provides it (the decorator moved to ``crewai.tools``), so the call raises ImportError
against any server. With the decorator put back (``crewai_tools.tool = crewai.tools.tool``, or an
old crewai-tools that has it), "Remember a fact" and "Recall a fact" work against our server, and
"List remembered keys" raises TypeError: it joins ``Memory.keys()`` as strings while the hosted
API's listing (which ours reproduces) gives key objects. That is the client's bug, the same
against the hosted service; our server follows the hosted format."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from botwire_stream import AsyncMemory

_TOOLS = r"""
import json, sys
import crewai_tools
out = {"has_decorator": hasattr(crewai_tools, "tool")}
from botwire.memory import memory_tools
if not out["has_decorator"]:
    try:
        memory_tools(sys.argv[1])
    except ImportError as exc:
        out["import_error"] = str(exc)
    import crewai.tools
    crewai_tools.tool = crewai.tools.tool  # the user's workaround: the decorator where it moved
tools = memory_tools(sys.argv[1])
out["names"] = [t.name for t in tools]
remember, recall, list_keys = tools

# as its users do: the tools in an agent's toolbox, the agent deciding to call them
from crewai import Agent, Crew, Task
from tests.crewai_fakes import ScriptedLLM
llm = ScriptedLLM(model="scripted")
llm.replies = [
    'Thought: store it\nAction: Remember a fact\nAction Input: {"key": "city", "value": "Lisbon"}',
    'Thought: read it\nAction: Recall a fact\nAction Input: {"key": "from-lib"}',
    "Thought: done\nFinal Answer: ok",
]
agent = Agent(role="Notes", goal="Keep notes", backstory="Careful", llm=llm, tools=tools)
task = Task(description="Remember that I live in Lisbon", expected_output="ok", agent=agent)
out["answer"] = str(Crew(agents=[agent], tasks=[task]).kickoff())
out["observations"] = "\n".join(llm.prompts)
out["recall_missing"] = recall.run(key="nope")
try:
    out["list"] = list_keys.run()
except TypeError as exc:
    out["list_error"] = str(exc)
print(json.dumps(out))
"""


@pytest.mark.slow
async def test_its_crewai_memory_tools_against_botwire_serve(
    http_server: str, url: str, namespace: str, tmp_path: Path
) -> None:
    async with AsyncMemory(namespace, url=url) as mem:
        await mem.set("from-lib", "written by botwire-stream")
        env = {
            **os.environ,
            "BOTWIRE_URL": http_server,
            "CREWAI_DISABLE_TELEMETRY": "true",
            "OTEL_SDK_DISABLED": "true",
        }
        env["CREWAI_STORAGE_DIR"] = str(tmp_path / "crewai")  # its files: this test's own
        done = subprocess.run(
            [sys.executable, "-c", _TOOLS, namespace], capture_output=True, text=True, timeout=180, env=env
        )
        assert done.returncode == 0, done.stderr[-3000:]
        out = json.loads(done.stdout.strip().splitlines()[-1])
        if not out["has_decorator"]:
            assert "cannot import name 'tool' from 'crewai_tools'" in out["import_error"]
        assert out["names"] == ["Remember a fact", "Recall a fact", "List remembered keys"]
        assert out["answer"] == "ok"
        assert "stored 'city'" in out["observations"]  # the tool's own reply, fed back to the model
        assert "written by botwire-stream" in out["observations"]  # what our Memory wrote, recalled
        assert out["recall_missing"] == "not found"
        # its listing tool joins the hosted API's key objects as strings: the client's own bug
        assert "expected str instance, dict found" in out["list_error"]
        assert await mem.get("city") == "Lisbon"  # what the agent stored, our Memory reads
