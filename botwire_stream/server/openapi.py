"""``/openapi.json`` (OpenAPI 3.1) and ``/docs``: the schemas are generated from the msgspec
structs the handlers decode and encode (``msgspec.json.schema_components``), so the document
cannot drift from what the server validates."""

from __future__ import annotations

import html
from typing import Any

import msgspec

from . import chatapi, hosted, rest, rest_chat, rest_keys, rest_replay

__all__ = ["document", "docs_page"]

_REF = "#/components/schemas/{name}"
# not "^...$": Python's $ also matches before a final newline (chatapi.schema_pattern)
_NS = {"name": "namespace", "in": "path", "required": True, "schema": {"type": "string", "pattern": chatapi.schema_pattern("[A-Za-z0-9_-]{1,64}")}}
_KEY = {"name": "key", "in": "path", "required": True, "description": "percent-encoded; any UTF-8 string of 1-1024 bytes", "schema": {"type": "string", "minLength": 1}}
_SESSION = {"name": "session", "in": "path", "required": True, "description": "1-256 characters, no control characters", "schema": {"type": "string", "minLength": 1, "maxLength": 256}}


def _q(name: str, kind: str = "string", desc: str = "") -> dict[str, Any]:
    schema: dict[str, Any] = {"type": kind}
    if kind == "integer":
        schema["minimum"] = 0
    return {"name": name, "in": "query", "required": False, "schema": schema, "description": desc}


def _ref(name: str) -> dict[str, Any]:
    return {"$ref": _REF.format(name=name)}


_DETAIL = {"type": "object", "properties": {"detail": {}}, "required": ["detail"]}


def _op(summary: str, ok: str | None, params: list[dict[str, Any]], body: str | None = None, status: str = "200", sse: bool = False, hosted: bool = False) -> dict[str, Any]:
    content = {"text/event-stream": {"schema": {"type": "string"}}} if sse else {"application/json": {"schema": _ref(ok)}} if ok else {}
    error = (
        {"description": "the hosted API's error body", "content": {"application/json": {"schema": _DETAIL}}}
        if hosted
        else {"description": "an error of the library's tree (code: its class)", "content": {"application/json": {"schema": _ref("ErrorResponse")}}}
    )
    op: dict[str, Any] = {
        "summary": summary,
        "parameters": params,
        "responses": {status: {"description": "OK", "content": content}, "default": error},
    }
    if body:
        op["requestBody"] = {"required": True, "content": {"application/json": {"schema": _ref(body)}}}
    return op


_STRUCTS: tuple[Any, ...] = (
    rest.ErrorResponse, rest_keys.SetKey, rest_keys.KeyValue, rest_keys.Written, rest_keys.Deleted, rest_keys.KeyPage,
    rest_keys.Revisions, rest_keys.ChangeOut, rest_chat.AppendBody, rest_chat.Appended, rest_chat.Messages,
    rest_chat.Count, rest_chat.ForkBody, rest_chat.Forked, rest_chat.Sessions, rest_chat.EntryOut,
    hosted.PutBody, hosted.Stored, hosted.Item, hosted.RemovedItem, hosted.Listing,
    rest_replay.EventOut, rest_replay.PastValue, rest_replay.PastMessages,
)


def document() -> dict[str, Any]:
    """The OpenAPI document of the REST API and the hosted wire format."""
    _, components = msgspec.json.schema_components(_STRUCTS, ref_template=_REF)
    hkey = {**_KEY, "description": "the hosted client sends it unescaped"}
    paths = {
        "/v1/ns/{namespace}/keys": {"get": _op("List keys matching a glob, sorted, paginated", "KeyPage", [_NS, _q("pattern", desc="fnmatch glob, default *"), _q("limit", "integer"), _q("after", desc="the previous page's next")])},
        "/v1/ns/{namespace}/keys/{key}": {
            "get": _op("Read a key (404 not_found when it holds no value)", "KeyValue", [_NS, _KEY]),
            "put": _op("Write a key (ttl; revision: conditional write, 409 conflict)", "Written", [_NS, _KEY], "SetKey"),
            "delete": _op("Delete a key (kept in its revisions)", "Deleted", [_NS, _KEY]),
        },
        "/v1/ns/{namespace}/keys/{key}/revisions": {"get": _op("The key's kept revisions, oldest first", "Revisions", [_NS, _KEY])},
        "/v1/ns/{namespace}/watch": {"get": _op("SSE: live changes of the keys matching pattern (event change, id revision)", None, [_NS, _q("pattern")], sse=True)},
        "/v1/ns/{namespace}/chats": {"get": _op("Conversations, newest activity first", "Sessions", [_NS, _q("pattern"), _q("limit", "integer"), _q("offset", "integer")])},
        "/v1/ns/{namespace}/chats/{session}/messages": {
            "get": _op("Messages with sequence and time", "Messages", [_NS, _SESSION, _q("after", "integer"), _q("last", "integer")]),
            "post": _op("Append one message or several atomically", "Appended", [_NS, _SESSION], "AppendBody"),
            "delete": _op("Clear the conversation", "Count", [_NS, _SESSION]),
        },
        "/v1/ns/{namespace}/chats/{session}/count": {"get": _op("How many messages", "Count", [_NS, _SESSION])},
        "/v1/ns/{namespace}/chats/{session}/fork": {"post": _op("Copy into a new conversation", "Forked", [_NS, _SESSION], "ForkBody", status="201")},
        "/v1/ns/{namespace}/chats/{session}/events": {"get": _op("SSE: live messages (event message, id sequence; resume with Last-Event-ID or after)", None, [_NS, _SESSION, _q("after", "integer")], sse=True)},
        "/v1/ns/{namespace}/replay": {"get": {
            **_op("NDJSON: every kept event, oldest first, one EventOut per line (a last line {error} if one stops it)", "EventOut", [
                _NS, _q("start", desc="a sequence (digits) or an ISO-8601 time"), _q("end", desc="as start, inclusive"),
                _q("keys", desc="key glob, default *; empty: no keys"), _q("conversations", desc="session glob, default *; empty: none")]),
            "responses": {"200": {"description": "OK", "content": {"application/x-ndjson": {"schema": _ref("EventOut")}}}, "default": _op("", None, [])["responses"]["default"]},
        }},
        "/v1/ns/{namespace}/past/keys/{key}": {"get": _op("The key as of at (410 before_retention when no longer kept)", "PastValue", [_NS, _KEY, _q("at", desc="ISO-8601 time")])},
        "/v1/ns/{namespace}/past/chats/{session}": {"get": _op("The conversation's messages as of at (410 before_retention)", "PastMessages", [_NS, _SESSION, _q("at", desc="ISO-8601 time")])},
        "/memory/{namespace}": {"get": _op("Hosted format: keys, newest first", "Listing", [_NS, _q("limit", "integer")], hosted=True)},
        "/memory/{namespace}/{key}": {
            "get": _op("Hosted format: read a string value", "Item", [_NS, hkey], hosted=True),
            "put": _op("Hosted format: write a string value", "Stored", [_NS, hkey], "PutBody", hosted=True),
            "delete": _op("Hosted format: delete", "RemovedItem", [_NS, hkey], hosted=True),
        },
    }
    paths.update(_chat_paths())
    components.update(_chat_components())
    return {
        "openapi": "3.1.0",
        "info": {"title": "botwire serve", "version": "1"},
        "paths": paths,
        "components": {"schemas": components},
    }


def _chat_components() -> dict[str, Any]:
    """The chat endpoint's bodies, from the structs its handlers encode and check (``chatapi``)."""
    _, components = msgspec.json.schema_components(chatapi.STRUCTS, ref_template=_REF)
    return components


def _chat_op(summary: str, ok: str, status: str, params: list[dict[str, Any]], body: str | None = None) -> dict[str, Any]:
    """A chat route: its refusals are ``{"error": text}`` (``ChatError``), not the REST API's."""
    op: dict[str, Any] = {
        "summary": summary,
        "parameters": params,
        "responses": {
            status: {"description": "OK", "content": {"application/json": {"schema": _ref(ok)}}},
            "default": {"description": "a refusal (4xx), nothing written", "content": {"application/json": {"schema": _ref("ChatError")}}},
        },
    }
    if body:
        op["requestBody"] = {"required": True, "content": {"application/json": {"schema": _ref(body)}}}
    return op


def _chat_paths() -> dict[str, Any]:
    """The chat endpoint (``chatapi.ChatService.routes``): the path parameters keep the routes'
    names, so tests/test_serve_review.py can match the app's routes to these paths."""
    ns = {**_NS, "name": "ns"}
    user = {"name": "user", "in": "query", "required": True, "schema": {"type": "string", "pattern": chatapi.USER_PATTERN}}
    key = {
        "name": "Idempotency-Key", "in": "header", "required": False, "schema": {"type": "string", "pattern": chatapi.IDEMPOTENCY_KEY_PATTERN},
        "description": "a repeat with the same key and message within 24 h gets the same 202 and stores nothing (422: another message)",
    }
    return {
        "/v1/chat/{ns}": {
            "get": _chat_op("The user's conversations, newest activity first", "ConversationList", "200", [ns, user]),
            "post": _chat_op("Start a conversation for a user", "Created", "201", [ns], "NewConversation"),
        },
        "/v1/chat/{ns}/{session}": {"get": _chat_op("A conversation's title and stream (404: none)", "Conversation", "200", [ns, _SESSION])},
        "/v1/chat/{ns}/{session}/messages": {
            "post": _chat_op("Ask: store the message, stream the model's answer (413: too long)", "Accepted", "202", [ns, _SESSION, key], "NewMessage"),
        },
    }


def docs_page() -> str:
    """A self-contained HTML page listing the operations (no external scripts)."""
    rows = []
    for path, ops in document()["paths"].items():
        for method, op in ops.items():
            rows.append(f"<tr><td>{method.upper()}</td><td><code>{html.escape(path)}</code></td><td>{html.escape(op['summary'])}</td></tr>")
    return (
        "<!doctype html><html><head><meta charset='utf-8'><title>botwire serve API</title></head><body>"
        "<h1>botwire serve API</h1><p>Machine-readable: <a href='/openapi.json'>/openapi.json</a>. "
        "Errors: <code>{\"error\": {\"code\", \"message\"}}</code>.</p><table>" + "".join(rows) + "</table></body></html>"
    )
