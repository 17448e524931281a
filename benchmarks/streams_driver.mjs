// Load driver for benchmarks/streams.py: Node's global fetch (undici, keep-alive) against each
// Durable Streams server given, interleaved in rounds. Prints one JSON document of samples (ms).
// argv[2]: JSON {servers: {name: baseUrl}, appends, warmup, catchupMsgs, catchupReads, liveMsgs, sseReaders}
const cfg = JSON.parse(process.argv[2]);
const names = Object.keys(cfg.servers);
const JSON_CT = { "content-type": "application/json" };
const pad = "x".repeat(200);

function message(i) {
  // ~200 bytes of JSON, as in the reference figures: {"conv","i","role","ts","text"} padded
  const m = { conv: "c1", i, role: i % 2 ? "assistant" : "user", ts: 1764500000000 + i, text: "" };
  m.text = pad.slice(0, Math.max(0, 200 - JSON.stringify(m).length));
  return JSON.stringify(m);
}
const now = () => Number(process.hrtime.bigint()) / 1e6;
let uniq = 0;
async function create(base) {
  const url = `${base}/v1/stream/bench-${process.pid}-${Date.now()}-${uniq++}`;
  const r = await fetch(url, { method: "PUT", headers: JSON_CT });
  if (r.status !== 201) throw new Error(`PUT ${url}: ${r.status}`);
  await r.arrayBuffer();
  return url;
}
async function post(url, body) {
  const r = await fetch(url, { method: "POST", headers: JSON_CT, body });
  await r.arrayBuffer();
  if (r.status !== 204 && r.status !== 200) throw new Error(`POST ${url}: ${r.status}`);
  return r;
}

const out = {};
for (const n of names) out[n] = { append: [], appendWall: [], catchup: [], live: [], sse: null };

// -- sequential appends, interleaved in rounds ------------------------------------------------
const streams = {};
for (const n of names) {
  streams[n] = await create(cfg.servers[n]);
  for (let i = 0; i < cfg.warmup; i++) await post(streams[n], message(i));
}
const rounds = 4;
const per = Math.ceil(cfg.appends / rounds);
for (let r = 0; r < rounds; r++) {
  const order = names.slice(r % names.length).concat(names.slice(0, r % names.length));
  for (const n of order) {
    const t0 = now();
    for (let i = 0; i < per; i++) {
      const s = now();
      await post(streams[n], message(i));
      out[n].append.push(now() - s);
    }
    out[n].appendWall.push([per, now() - t0]);
  }
}

// -- catch-up of a stream of catchupMsgs messages ---------------------------------------------
async function readAll(url) {
  let offset = "-1", items = 0;
  for (;;) {
    const r = await fetch(`${url}?offset=${encodeURIComponent(offset)}`);
    const body = await r.text();
    items += JSON.parse(body).length;
    offset = r.headers.get("stream-next-offset");
    if (r.headers.get("stream-up-to-date") === "true") return items;
  }
}
const full = {};
for (const n of names) {
  full[n] = await create(cfg.servers[n]);
  for (let i = 0; i < cfg.catchupMsgs; i++) await post(full[n], message(i));
  for (let i = 0; i < 3; i++) await readAll(full[n]);
}
for (let r = 0; r < cfg.catchupReads; r++) {
  for (const n of names) {
    const s = now();
    const items = await readAll(full[n]);
    out[n].catchup.push(now() - s);
    if (items !== cfg.catchupMsgs) throw new Error(`${n}: read ${items} of ${cfg.catchupMsgs}`);
  }
}

// -- live delivery to a long-poll reader at the tail -------------------------------------------
async function live(n) {
  const url = await create(cfg.servers[n]);
  let offset = (await (await fetch(url, { method: "HEAD" })).headers.get("stream-next-offset"));
  const sent = new Map();
  const lat = [];
  let stop = false;
  const reader = (async () => {
    while (!stop) {
      const r = await fetch(`${url}?offset=${encodeURIComponent(offset)}&live=long-poll`);
      const t = now();
      if (r.status === 200) {
        for (const m of JSON.parse(await r.text())) if (sent.has(m.i)) lat.push(t - sent.get(m.i));
      } else await r.arrayBuffer();
      offset = r.headers.get("stream-next-offset") ?? offset;
    }
  })();
  await new Promise((res) => setTimeout(res, 100));
  for (let i = 0; i < cfg.liveMsgs; i++) {
    sent.set(i, now());
    await post(url, message(i));
    await new Promise((res) => setTimeout(res, 5));
  }
  await new Promise((res) => setTimeout(res, 300));
  stop = true;
  await post(url, message(-1)); // release the last poll
  await reader;
  return lat;
}
for (const n of names) out[n].live = await live(n);

// -- many concurrent SSE readers of one stream --------------------------------------------------
async function sse(n, readers, chunks) {
  const url = await create(cfg.servers[n]);
  const sentAt = new Map();
  const lat = [];
  let ready = 0;
  const one = async () => {
    const ctrl = new AbortController();
    const r = await fetch(`${url}?offset=now&live=sse`, { signal: ctrl.signal });
    ready++;
    const dec = new TextDecoder();
    let buf = "", got = 0;
    for await (const part of r.body) {
      buf += dec.decode(part, { stream: true });
      let k;
      while ((k = buf.indexOf("\n\n")) >= 0) {
        const block = buf.slice(0, k);
        buf = buf.slice(k + 2);
        if (!block.startsWith("event: data")) continue;
        const t = now();
        const data = block.split("\n").filter((l) => l.startsWith("data:")).map((l) => l.slice(5)).join("\n");
        for (const m of JSON.parse(data)) {
          lat.push(t - sentAt.get(m.i));
          got++;
        }
      }
      if (got >= chunks) break;
    }
    ctrl.abort();
    return got;
  };
  const all = Array.from({ length: readers }, one);
  const deadline = now() + 30000;
  while (ready < readers && now() < deadline) await new Promise((res) => setTimeout(res, 20));
  await new Promise((res) => setTimeout(res, 500));
  for (let i = 0; i < chunks; i++) {
    sentAt.set(i, now());
    await post(url, message(i));
    await new Promise((res) => setTimeout(res, 50));
  }
  const counts = await Promise.race([Promise.all(all), new Promise((res) => setTimeout(() => res(null), 60000))]);
  const complete = counts ? counts.filter((c) => c >= chunks).length : 0;
  return { readers, chunks, complete, ready, lat };
}
if (cfg.sseReaders > 0) for (const n of names) out[n].sse = await sse(n, cfg.sseReaders, cfg.sseChunks);

console.log(JSON.stringify(out));
