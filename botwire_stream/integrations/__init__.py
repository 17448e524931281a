"""Adapters that plug botwire-stream into agent frameworks.

Each adapter lives in its own module and imports its framework only when that module is imported
(``from botwire_stream.integrations.langchain import BotWireChatHistory``), so importing
``botwire_stream`` never pulls in a framework. Install the matching extra, e.g.
``pip install 'botwire-stream[langchain]'``.
"""

__all__: list[str] = []
