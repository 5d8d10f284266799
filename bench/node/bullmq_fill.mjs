// Adds N jobs of the lifecycle baseline's shape to a queue no worker reads,
// for the idle benchmark's memory per queued job.
//
//   node bullmq_fill.mjs --queue NAME --jobs N [--redis-port 6379]
//
// Prints {"bench":"filled","jobs":N} when every job is added.
import { Queue } from "bullmq";
import { parseArgs } from "node:util";

const { values: args } = parseArgs({
  options: {
    queue: { type: "string" },
    jobs: { type: "string", default: "1000" },
    "redis-port": { type: "string", default: "6379" },
  },
});
const PROMPT =
  "A golden retriever chases a red ball across a wet lawn in a park at dawn," +
  " cinematic handheld close-up.";
const queue = new Queue(args.queue, {
  connection: { host: "127.0.0.1", port: Number(args["redis-port"]) },
});
const total = Number(args.jobs);
for (let done = 0; done < total; done += 100) {
  const batch = [];
  for (let i = done; i < Math.min(total, done + 100); i++) {
    batch.push({
      name: "generate",
      data: {
        userId: `bench-user-${i % 50}`,
        prompt: PROMPT,
        durationSeconds: 4,
        n: i,
      },
    });
  }
  await queue.addBulk(batch);
}
console.log(JSON.stringify({ bench: "filled", jobs: total }));
await queue.close();
process.exit(0);
