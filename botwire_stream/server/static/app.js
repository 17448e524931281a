// The botwire chat page: plain JS, no build step.
// The conversation is read as a Durable Stream (/v1/stream/chat/<ns>/<session>, JSON messages) with
// long-polls, so every tab shows every message once it is stored. An answer in flight is read from its
// own stream (text); its offset and text so far are kept in sessionStorage, so a reload resumes it
// from that offset (nothing read twice, nothing skipped). The finished answer then arrives in the
// conversation and replaces the streamed text.
"use strict";

const NS = new URLSearchParams(location.search).get("ns") || "demo";
const $ = (id) => document.getElementById(id);
// The server's limits, written into the page it serves (chatapi.page_limits): one source, so the
// page keeps no user name the server refuses and sends no message it would refuse as too long.
const LIMITS = JSON.parse(document.querySelector('meta[name="botwire-limits"]').content);
const USER = new RegExp(LIMITS.user_pattern, "u"); // the JSON Schema pattern of /openapi.json
let user = localStorage.getItem("botwire.user");
if (!USER.test(user || "")) {
  user = "u" + crypto.getRandomValues(new Uint32Array(2)).join("").slice(0, 14);
  localStorage.setItem("botwire.user", user);
}

let current = null; // {session, abort: AbortController}
const answers = new Map(); // answer id -> {el, abort}

const sleep = (ms, signal) => new Promise((resolve) => {
  const t = setTimeout(resolve, ms);
  if (signal) signal.addEventListener("abort", () => { clearTimeout(t); resolve(); }, { once: true });
});

function setStatus(text) { if ($("status").textContent !== text) $("status").textContent = text; }

class HttpError extends Error {
  constructor(status, message) { super(message); this.status = status; }
}

async function api(path, options) {
  const r = await fetch(path, options);
  const body = await r.json().catch(() => ({}));
  if (!r.ok) throw new HttpError(r.status, body.error || `HTTP ${r.status}`);
  return body;
}

// One key per question: a POST sent again with it (its response was lost) is answered with the
// same 202 and stores nothing twice. getRandomValues, not randomUUID: the page may be served over
// plain http to another host, where randomUUID does not exist.
function idempotencyKey() {
  return Array.from(crypto.getRandomValues(new Uint8Array(16)), (b) => b.toString(16).padStart(2, "0")).join("");
}

async function postQuestion(session, content) {
  const key = idempotencyKey();
  for (let attempt = 0; ; attempt++) {
    try {
      return await api(`/v1/chat/${NS}/${encodeURIComponent(session)}/messages`, {
        method: "POST", headers: { "content-type": "application/json", "Idempotency-Key": key }, body: JSON.stringify({ content }),
      });
    } catch (e) {
      // fetch rejects with a TypeError when no response came (the connection broke): the
      // question may be stored, so it is asked again with the same key (and a 409: still at work)
      const again = e instanceof TypeError || (e instanceof HttpError && [409, 502, 503, 504].includes(e.status));
      if (!again || attempt >= 5) throw e;
      setStatus("reconnecting…");
      await sleep(250 * 2 ** attempt);
    }
  }
}

async function listConversations() {
  try {
    const { conversations } = await api(`/v1/chat/${NS}?user=${encodeURIComponent(user)}`);
    const ul = $("conversations");
    ul.replaceChildren(...conversations.map((c) => {
      const li = document.createElement("li");
      const a = document.createElement("a");
      a.href = "#" + encodeURIComponent(c.session);
      a.textContent = c.title || "New conversation";
      a.dataset.session = c.session;
      if (current && c.session === current.session) {
        a.setAttribute("aria-current", "page");
        $("title").textContent = a.textContent;
      }
      li.append(a);
      return li;
    }));
    return conversations;
  } catch (e) {
    setStatus("cannot list conversations: " + e.message);
    return [];
  }
}

async function newConversation() {
  const { session } = await api(`/v1/chat/${NS}`, {
    method: "POST", headers: { "content-type": "application/json" }, body: JSON.stringify({ user }),
  });
  location.hash = encodeURIComponent(session);
  return session;
}

function openConversation(session) {
  if (current) current.abort.abort();
  for (const a of answers.values()) a.abort.abort();
  answers.clear();
  $("log").replaceChildren();
  current = { session, abort: new AbortController() };
  $("title").textContent = "Conversation";
  for (const a of document.querySelectorAll("#conversations a")) {
    if (a.dataset.session === session) a.setAttribute("aria-current", "page"); else a.removeAttribute("aria-current");
  }
  api(`/v1/chat/${NS}/${encodeURIComponent(session)}`).then((c) => { $("title").textContent = c.title; }).catch(() => {});
  tailConversation(session, current.abort.signal);
  $("message").focus();
}

function bubble(role) {
  const li = document.createElement("li");
  li.className = role;
  $("log").append(li);
  return li;
}

function finish(el, message) {
  el.classList.remove("streaming");
  el.textContent = message.content;
  el.removeAttribute("aria-busy");
  if (message.meta && message.meta.incomplete) {
    el.classList.add("incomplete");
    const note = document.createElement("span");
    note.className = "note";
    note.textContent = "(incomplete: " + (message.meta.error || "the answer stopped") + ")";
    el.append(note);
  }
}

function render(message, fresh) {
  const meta = message.meta || {};
  if (message.role === "user") {
    bubble("user").textContent = message.content;
    if (meta.answer && meta.stream) {
      const el = bubble("assistant");
      el.classList.add("streaming");
      el.setAttribute("aria-busy", "true");
      el.dataset.answer = meta.answer;
      answers.set(meta.answer, { el, stream: meta.stream, abort: new AbortController(), started: false });
      fresh.push(meta.answer);
    }
    return;
  }
  const pending = meta.answer && answers.get(meta.answer);
  if (pending) {
    // the reader goes on to the stream's close (a moment: the stream is closed before the
    // conversation gets the answer) but no longer draws: the stored answer is what shows
    pending.final = true;
    if (!pending.started) {
      answers.delete(meta.answer);
      sessionStorage.removeItem("botwire.answer." + meta.answer);
    }
    finish(pending.el, message);
  } else {
    finish(bubble(message.role || "assistant"), message);
  }
}

async function tailConversation(session, signal) {
  const base = `/v1/stream/chat/${NS}/${encodeURIComponent(session)}`;
  let offset = "-1", live = false;
  while (!signal.aborted) {
    try {
      const r = await fetch(`${base}?offset=${offset}${live ? "&live=long-poll" : ""}`, { signal, cache: "no-store" });
      if (r.status >= 400) throw new Error(`HTTP ${r.status}`);
      if (r.status === 200) {
        const fresh = [];
        for (const m of await r.json()) render(m, fresh);
        for (const id of fresh) if (answers.has(id)) readAnswer(id);
      }
      offset = r.headers.get("Stream-Next-Offset") || offset;
      live = r.headers.get("Stream-Up-To-Date") === "true";
      setStatus("connected");
    } catch (e) {
      if (signal.aborted) return;
      setStatus("reconnecting…");
      await sleep(1000, signal);
    }
  }
}

async function readAnswer(id) {
  const a = answers.get(id);
  if (!a || a.started) return;
  a.started = true;
  const key = "botwire.answer." + id;
  const saved = JSON.parse(sessionStorage.getItem(key) || "null");
  let offset = saved ? saved.offset : "-1";
  let text = saved ? saved.text : "";
  a.el.dataset.resumedFrom = offset;
  a.el.dataset.streamed = text;
  if (!a.final) a.el.textContent = text;
  while (!a.abort.signal.aborted) {
    try {
      const r = await fetch(`/v1/stream/${a.stream}?offset=${offset}&live=long-poll`, { signal: a.abort.signal, cache: "no-store" });
      if (r.status === 404 || r.status === 410) return; // expired: the conversation holds the answer
      if (r.status >= 400) throw new Error(`HTTP ${r.status}`);
      if (r.status === 200) {
        const chunk = await r.text();
        if (a.abort.signal.aborted) return;
        text += chunk;
        if (!a.final) a.el.textContent = text;
        a.el.dataset.streamed = text;
      }
      offset = r.headers.get("Stream-Next-Offset") || offset;
      if (r.headers.get("Stream-Closed") === "true") {
        a.el.dataset.closed = "true";
        sessionStorage.removeItem(key);
        return;
      }
      sessionStorage.setItem(key, JSON.stringify({ offset, text }));
    } catch (e) {
      if (a.abort.signal.aborted) return;
      await sleep(500, a.abort.signal);
    }
  }
}

async function send(event) {
  event.preventDefault();
  const box = $("message");
  const content = box.value;
  if (!content.trim()) return;
  $("error").textContent = "";
  const chars = [...content].length; // code points, as the server counts (not maxlength's UTF-16 units)
  if (chars > LIMITS.message_chars) {
    $("error").textContent = `Not sent: a message holds at most ${LIMITS.message_chars} characters, not ${chars}`;
    return;
  }
  $("send").disabled = true;
  try {
    if (!current) openConversation(await newConversation());
    await postQuestion(current.session, content);
    box.value = "";
    listConversations();
  } catch (e) {
    $("error").textContent = "Not sent: " + e.message;
  } finally {
    $("send").disabled = false;
    box.focus();
  }
}

// The session named by the URL's #hash; "" when there is none or it is not valid percent-encoding
// (decodeURIComponent throws URIError on "#%E0%A4%A"): the page then stays on the conversation list.
function hashSession() {
  try {
    return decodeURIComponent(location.hash.slice(1));
  } catch (e) {
    history.replaceState(null, "", location.pathname + location.search);
    $("error").textContent = "That link names no conversation.";
    return "";
  }
}

function route() {
  const session = hashSession();
  if (session && (!current || current.session !== session)) openConversation(session);
}

async function start() {
  $("composer").addEventListener("submit", send);
  $("message").addEventListener("keydown", (e) => {
    if (e.key === "Enter" && !e.shiftKey && !e.isComposing) { e.preventDefault(); $("composer").requestSubmit(); }
  });
  $("new").addEventListener("click", () => newConversation().catch((e) => { $("error").textContent = e.message; }));
  window.addEventListener("hashchange", route);
  window.addEventListener("focus", listConversations);
  const conversations = await listConversations();
  if (!hashSession() && conversations.length) location.hash = encodeURIComponent(conversations[0].session);
  route();
}

start();
