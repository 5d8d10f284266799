// WebSocket subscribers of the fan-out and idle benchmarks: one process
// holds a share of the connections, each subscribed to one topic, and
// counts every event that arrives and its latency from the publisher's
// stamp (data.sentAt, epoch seconds) to receipt.
//
//   node fanout_clients.mjs --mode nimu|socketio --url URL
//        --assignments FILE --first I --count N [--connect-concurrency 200]
//
// FILE: {"topics": [...], "tokens": [...]}; connection i subscribes to
// topics[i % M] (with tokens[i % M] for nimu_rt). Prints {"bench":"ready"}
// once every connection is subscribed, then waits for stdin lines:
//   "report <published JSON>"  print {"bench":"received",...} and exit
//   "rss"                        print {"bench":"rss"} (for idle runs)
import WebSocket from "ws";
import { io } from "socket.io-client";
import { readFileSync } from "node:fs";
import { createInterface } from "node:readline";
import { parseArgs } from "node:util";

const { values: args } = parseArgs({
  options: {
    mode: { type: "string" },
    url: { type: "string" },
    assignments: { type: "string" },
    first: { type: "string", default: "0" },
    count: { type: "string", default: "1" },
    "connect-concurrency": { type: "string", default: "200" },
  },
});

const { topics, tokens } = JSON.parse(readFileSync(args.assignments, "utf8"));
const first = Number(args.first);
const count = Number(args.count);
const nowMs = () => performance.timeOrigin + performance.now();

// Latency histogram: 10 us buckets below 100 ms, then 1 ms buckets to 10 s.
const FINE = 10000;
const hist = new Uint32Array(FINE + 10000 + 1);
function record(ms) {
  let b;
  if (ms < 0) b = 0;
  else if (ms < 100) b = Math.floor(ms * 100);
  else b = Math.min(FINE + Math.floor(ms - 100), hist.length - 1);
  hist[b] += 1;
}

const conns = []; // {topic, received, lastSeq, gaps}
let closedEarly = 0;
let failed = 0;
let reporting = false;

function onEvent(conn, frame) {
  conn.received += 1;
  if (frame.seq != null) {
    if (conn.lastSeq != null && frame.seq !== conn.lastSeq + 1) conn.gaps += 1;
    conn.lastSeq = frame.seq;
  }
  const sent = frame.data && frame.data.sentAt;
  if (sent) record(nowMs() - sent * 1000);
}

function openNimu(i) {
  return new Promise((resolve) => {
    const m = i % topics.length;
    const conn = { topic: topics[m], received: 0, lastSeq: null, gaps: 0 };
    const ws = new WebSocket(args.url, {
      headers: { Authorization: `Bearer ${tokens[m]}` },
      perMessageDeflate: false,
    });
    let subscribed = false;
    ws.on("open", () => {
      ws.send(JSON.stringify({ op: "subscribe", topic: conn.topic }));
    });
    ws.on("message", (raw) => {
      const frame = JSON.parse(raw);
      if (frame.op === "event") onEvent(conn, frame);
      else if (frame.op === "subscribed" && !subscribed) {
        subscribed = true;
        conn.lastSeq = frame.seq;
        conns.push(conn);
        resolve(true);
      } else if (frame.op === "error") {
        failed += 1;
        resolve(false);
      }
    });
    ws.on("error", () => {
      if (!subscribed) {
        failed += 1;
        resolve(false);
      }
    });
    ws.on("close", () => {
      if (subscribed && !reporting) closedEarly += 1;
    });
  });
}

function openSocketIo(i) {
  return new Promise((resolve) => {
    const m = i % topics.length;
    const conn = { topic: topics[m], received: 0, lastSeq: null, gaps: 0 };
    const socket = io(args.url, {
      transports: ["websocket"],
      forceNew: true,
      reconnection: false,
    });
    let subscribed = false;
    socket.on("connect", () => {
      socket.emit("subscribe", conn.topic, () => {
        subscribed = true;
        conns.push(conn);
        resolve(true);
      });
    });
    socket.on("event", (frame) => onEvent(conn, frame));
    socket.on("connect_error", () => {
      failed += 1;
      resolve(false);
    });
    socket.on("disconnect", () => {
      if (subscribed && !reporting) closedEarly += 1;
    });
  });
}

const open = args.mode === "nimu" ? openNimu : openSocketIo;
const started = performance.now();
let next = first;
const end = first + count;
async function opener() {
  while (next < end) {
    const i = next++;
    await open(i);
  }
}
await Promise.all(
  Array.from({ length: Number(args["connect-concurrency"]) }, opener),
);
console.log(
  JSON.stringify({
    bench: "ready",
    subscribed: conns.length,
    failed,
    connect_s: (performance.now() - started) / 1000,
  }),
);

function percentile(q) {
  let total = 0;
  for (const c of hist) total += c;
  if (!total) return null;
  const rank = Math.max(1, Math.ceil(q * total));
  let seen = 0;
  for (let b = 0; b < hist.length; b++) {
    seen += hist[b];
    if (seen >= rank) return b < FINE ? (b + 0.5) / 100 : 100 + (b - FINE) + 0.5;
  }
  return null;
}

const lines = createInterface({ input: process.stdin });
for await (const line of lines) {
  if (line === "rss") {
    console.log(JSON.stringify({ bench: "rss", rss: process.memoryUsage().rss }));
    continue;
  }
  if (!line.startsWith("report")) continue;
  reporting = true;
  const published = JSON.parse(line.slice(7) || "{}");
  let received = 0;
  let expected = 0;
  let short = 0;
  let extra = 0;
  let gaps = 0;
  for (const c of conns) {
    const want = published[c.topic] ?? 0;
    received += c.received;
    expected += want;
    if (c.received < want) short += 1;
    if (c.received > want) extra += c.received - want;
    gaps += c.gaps;
  }
  const buckets = {};
  hist.forEach((n, b) => {
    if (n) buckets[b] = n;
  });
  console.log(
    JSON.stringify({
      bench: "received",
      connections: conns.length,
      closed_early: closedEarly,
      received,
      expected,
      lost: expected - received + extra,
      short_connections: short,
      duplicates: extra,
      seq_gaps: gaps,
      p50_ms: percentile(0.5),
      p99_ms: percentile(0.99),
      hist: buckets,
    }),
  );
  process.exit(0);
}
