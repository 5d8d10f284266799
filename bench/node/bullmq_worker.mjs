// BullMQ worker of the lifecycle baseline: the same job shape as a nimu_rt
// generation seen from outside: five awaited progress updates, then a
// result the size of a stored video's metadata. No real work is done.
//
//   node bullmq_worker.mjs --queue NAME --concurrency C [--redis-port 6379]
//
// Prints {"bench":"ready"} once the worker is connected; stops on SIGTERM.
import { Worker } from "bullmq";
import { parseArgs } from "node:util";

const { values: args } = parseArgs({
  options: {
    queue: { type: "string" },
    concurrency: { type: "string", default: "1" },
    "redis-port": { type: "string", default: "6379" },
  },
});

const connection = {
  host: "127.0.0.1",
  port: Number(args["redis-port"]),
  maxRetriesPerRequest: null,
};

const worker = new Worker(
  args.queue,
  async (job) => {
    for (let step = 1; step <= 5; step++) {
      await job.updateProgress(step * 20);
    }
    return {
      key: `videos/${job.data.userId}/${job.id}.mp4`,
      contentType: "video/mp4",
      sizeBytes: 48213,
      sha256: "9f2c5d0e4b1a7c3e8d6f0a2b4c6e8f0a1b3c5d7e9f1a3b5c7d9e1f3a5b7c9d1e",
      durationSeconds: 4.0,
      width: 114,
      height: 64,
      codec: "h264",
      frameRate: 24.0,
      hasAudio: true,
      thumbnailKey: `videos/${job.data.userId}/${job.id}.jpg`,
    };
  },
  { connection, concurrency: Number(args.concurrency), autorun: true },
);

await worker.waitUntilReady();
console.log(JSON.stringify({ bench: "ready", pid: process.pid }));

process.on("SIGTERM", async () => {
  await worker.close();
  process.exit(0);
});
