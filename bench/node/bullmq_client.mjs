// Producer and listener of the lifecycle baseline, in one process apart
// from the worker: closed-loop lanes, each adding one job and waiting until
// QueueEvents has delivered its five progress events and its "completed".
// The same loop as bench/lifecycle_load.py runs against nimu_rt.
//
//   node bullmq_client.mjs --queue NAME --lanes C --start-at EPOCH_S
//        --warmup-s W --measure-s M [--redis-port 6379]
//
// Completions inside [start + W, start + W + M] are counted; afterwards the
// lanes finish their job and stop. Prints {"bench":"lifecycle-load",...}.
import { Queue, QueueEvents } from "bullmq";
import { parseArgs } from "node:util";

const { values: args } = parseArgs({
  options: {
    queue: { type: "string" },
    lanes: { type: "string", default: "1" },
    "start-at": { type: "string", default: "0" },
    "warmup-s": { type: "string", default: "3" },
    "measure-s": { type: "string", default: "15" },
    "job-timeout-s": { type: "string", default: "60" },
    "redis-port": { type: "string", default: "6379" },
  },
});

const connection = { host: "127.0.0.1", port: Number(args["redis-port"]) };
const lanes = Number(args.lanes);
const start = Number(args["start-at"]) || Date.now() / 1000;
const windowStart = start + Number(args["warmup-s"]);
const windowEnd = windowStart + Number(args["measure-s"]);
const jobTimeoutMs = Number(args["job-timeout-s"]) * 1000;
const PROMPT =
  "A golden retriever chases a red ball across a wet lawn in a park at dawn," +
  " cinematic handheld close-up.";

const queue = new Queue(args.queue, { connection });
const events = new QueueEvents(args.queue, {
  connection: { ...connection, maxRetriesPerRequest: null },
});
await events.waitUntilReady();
await queue.waitUntilReady();

// jobId -> {progress: n, done: bool, resolve}
const seen = new Map();
function entry(id) {
  let e = seen.get(id);
  if (!e) {
    e = { progress: 0, done: false, resolve: null };
    seen.set(id, e);
  }
  return e;
}
events.on("progress", ({ jobId }) => {
  entry(jobId).progress += 1;
});
events.on("completed", ({ jobId }) => {
  const e = entry(jobId);
  e.done = true;
  if (e.resolve) e.resolve();
});

const stats = {
  completed: 0,
  completedInWindow: 0,
  events: 0,
  eventsInWindow: 0,
  missing: 0,
  latencies: [],
  errors: [],
};

function waitDone(id) {
  const e = entry(id);
  if (e.done) return Promise.resolve();
  return new Promise((resolve, reject) => {
    const timer = setTimeout(
      () => reject(new Error(`job ${id} not completed in time`)),
      jobTimeoutMs,
    );
    e.resolve = () => {
      clearTimeout(timer);
      resolve();
    };
  });
}

let userSeq = 0;
async function lane(index) {
  while (Date.now() / 1000 < windowEnd) {
    const t0 = performance.now();
    try {
      const job = await queue.add("generate", {
        userId: `bench-user-${index}`,
        prompt: PROMPT,
        durationSeconds: 4,
        n: userSeq++,
      });
      await waitDone(job.id);
      const e = seen.get(job.id);
      seen.delete(job.id);
      const count = e.progress + 1;
      const now = Date.now() / 1000;
      stats.completed += 1;
      stats.events += count;
      if (e.progress !== 5) stats.missing += 5 - e.progress;
      if (now >= windowStart && now < windowEnd) {
        stats.completedInWindow += 1;
        stats.eventsInWindow += count;
        stats.latencies.push(performance.now() - t0);
      }
    } catch (err) {
      stats.errors.push(String(err).slice(0, 300));
      if (stats.errors.length > 50) throw err;
    }
  }
}

function pct(values, q) {
  if (!values.length) return null;
  const s = [...values].sort((a, b) => a - b);
  const i = Math.min(s.length - 1, Math.max(0, Math.round(q * s.length + 0.5) - 1));
  return s[i];
}

const delay = start * 1000 - Date.now();
if (delay > 0) await new Promise((r) => setTimeout(r, delay));
await Promise.allSettled(Array.from({ length: lanes }, (_, i) => lane(i)));
// Progress events of a job arrive before its completed event on the same
// stream, so nothing is left in flight; a short grace covers a slow reader.
await new Promise((r) => setTimeout(r, 200));
console.log(
  JSON.stringify({
    bench: "lifecycle-load",
    lanes,
    measure_s: Number(args["measure-s"]),
    completed: stats.completed,
    completed_in_window: stats.completedInWindow,
    failed: 0,
    events: stats.events,
    events_in_window: stats.eventsInWindow,
    seq_gaps: stats.missing,
    latency_ms_p50: pct(stats.latencies, 0.5),
    latency_ms_p99: pct(stats.latencies, 0.99),
    errors: stats.errors.slice(0, 10),
    error_count: stats.errors.length,
  }),
);
await events.close();
await queue.close();
process.exit(0);
