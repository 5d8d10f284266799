// The Socket.IO baseline of the fan-out and idle benchmarks: rooms by
// topic, and an in-process publisher sending the same frames nimu_rt sends
// (an "event" object with seq, type "progress" and data.sentAt stamped
// right before the emit).
//
//   node socketio_server.mjs --port P --topics FILE
//
// Prints {"bench":"ready"} when listening. stdin lines:
//   "publish RATE DURATION_S"  publish RATE events/s per topic, then print
//                              {"bench":"published",...}
//   "rss"                      print {"bench":"rss","rss":...}
import http from "node:http";
import { Server } from "socket.io";
import { readFileSync } from "node:fs";
import { createInterface } from "node:readline";
import { parseArgs } from "node:util";

const { values: args } = parseArgs({
  options: { port: { type: "string" }, topics: { type: "string" } },
});
const { topics } = JSON.parse(readFileSync(args.topics, "utf8"));

const server = http.createServer();
const ioServer = new Server(server, {
  transports: ["websocket"],
  perMessageDeflate: false,
  serveClient: false,
});
ioServer.on("connection", (socket) => {
  socket.on("subscribe", (topic, ack) => {
    socket.join(topic);
    if (typeof ack === "function") ack({ ok: true });
  });
});
await new Promise((resolve) => server.listen(Number(args.port), "127.0.0.1", resolve));
console.log(JSON.stringify({ bench: "ready", pid: process.pid }));

const seqs = new Map(topics.map((t) => [t, 1]));
const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

async function publish(rate, durationS) {
  const periodMs = 1000 / rate;
  const perTopic = {};
  for (const t of topics) perTopic[t] = 0;
  const start = Date.now() + 200;
  const end = start + durationS * 1000;
  let lateMax = 0;
  for (let k = 0; ; k++) {
    for (let i = 0; i < topics.length; i++) {
      const due = start + k * periodMs + (i * periodMs) / topics.length;
      if (due >= end) {
        return { perTopic, lateMax };
      }
      const delay = due - Date.now();
      if (delay > 0) await sleep(delay);
      else lateMax = Math.max(lateMax, -delay);
      const topic = topics[i];
      const seq = seqs.get(topic) + 1;
      seqs.set(topic, seq);
      const sentAt = (performance.timeOrigin + performance.now()) / 1000;
      ioServer.to(topic).emit("event", {
        op: "event",
        topic,
        generationId: topic.slice(11),
        seq,
        type: "progress",
        data: { progress: 5 + (k % 80), sentAt },
        at: new Date().toISOString(),
      });
      perTopic[topic] += 1;
    }
  }
}

const lines = createInterface({ input: process.stdin });
for await (const line of lines) {
  const [cmd, a, b] = line.split(" ");
  if (cmd === "rss") {
    console.log(JSON.stringify({ bench: "rss", rss: process.memoryUsage().rss }));
  } else if (cmd === "publish") {
    const { perTopic, lateMax } = await publish(Number(a), Number(b));
    let events = 0;
    for (const n of Object.values(perTopic)) events += n;
    console.log(
      JSON.stringify({
        bench: "published",
        events,
        per_topic: perTopic,
        late_max_ms: lateMax,
      }),
    );
  }
}
