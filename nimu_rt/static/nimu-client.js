// nimu-client.js: the browser client of nimu-rt, as one dependency-free ES
// module. It follows generations live over one WebSocket (/ws), reconnects
// with jittered exponential backoff and resumes each topic from the last seq
// it saw, and falls back to long-polling GET /api/generations/{id} while the
// WebSocket cannot connect. See the README, "Real-time", for the protocol.
//
//   import { NimuClient } from "/static/nimu-client.js";
//   const client = new NimuClient({ token });
//   const watch = client.watchGeneration(id, (generation, event) => render(generation));
//   ...
//   watch.stop();

// Close codes after which the client reconnects (and resumes); any other
// code (1000, 1008, 1009, 4500-4999) means "stop until something changes".
const RECONNECT_CODES = new Set([1001, 1005, 1006, 1011, 1012, 1013, 1014]);

export function reconnectsAfter(code) {
  return RECONNECT_CODES.has(code) || (code >= 4000 && code < 4500);
}

// Members of event data that describe the change rather than the generation.
const NOT_FIELDS = ["previousStatus", "reason"];

// The generation after an event frame: its data overwrites those fields.
export function applyEvent(state, frame) {
  const next = frame.type === "created" ? { ...frame.data } : { ...state, ...frame.data };
  for (const name of NOT_FIELDS) delete next[name];
  next.seq = frame.seq;
  if (frame.type !== "created") next.updatedAt = frame.at;
  return next;
}

const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));

export class NimuClient {
  // options:
  //   baseUrl     where the API is (default: this page's origin)
  //   token       a bearer token, or getToken: async () => token (called
  //               for every connection and poll, so it may refresh)
  //   wsUrl       default: baseUrl with ws(s):// and /ws
  //   onStatus    (mode) => ..., mode "connecting" | "websocket" |
  //               "polling" | "stopped" | "closed"
  //   pingIntervalMs, pongTimeoutMs   app-level heartbeat (browsers cannot
  //               see protocol pings): a connection silent for longer is
  //               replaced
  //   minBackoffMs, maxBackoffMs      reconnect backoff bounds
  //   wsFailuresBeforePolling         failed connects before long-polling
  //   pollWaitSeconds                 waitSeconds of each long-poll
  constructor(options = {}) {
    this.baseUrl = (options.baseUrl ?? globalThis.location.origin).replace(/\/$/, "");
    this.wsUrl = options.wsUrl ?? this.baseUrl.replace(/^http/, "ws") + "/ws";
    const token = options.token;
    this._getToken = options.getToken ?? (async () => token);
    this._onStatus = options.onStatus ?? (() => {});
    this._pingIntervalMs = options.pingIntervalMs ?? 25000;
    this._pongTimeoutMs = options.pongTimeoutMs ?? 10000;
    this._minBackoffMs = options.minBackoffMs ?? 250;
    this._maxBackoffMs = options.maxBackoffMs ?? 30000;
    this._failuresBeforePolling = options.wsFailuresBeforePolling ?? 3;
    this._pollWaitSeconds = options.pollWaitSeconds ?? 25;
    this._WebSocket = options.WebSocket ?? globalThis.WebSocket;
    this._fetch = options.fetch ?? globalThis.fetch.bind(globalThis);

    this._topics = new Map(); // topic -> watch entry
    this._ws = null;
    this._live = false; // authenticated and subscribed over the WebSocket
    this._failures = 0; // connects in a row that never opened
    this._attempt = 0;
    this._reconnectTimer = null;
    this._pingTimer = null;
    this._lastHeardAt = 0;
    this._polling = false;
    this._closed = false;
    this.mode = "connecting";
  }

  // Follow one generation. onUpdate(generation, event) is called with the
  // snapshot (event null) and after every change (event: the event frame).
  // onError(problem) is called when the server refuses the topic (for
  // instance {code: "not_found"}); the watch then stops.
  watchGeneration(id, onUpdate, { onError } = {}) {
    const topic = `generation:${id}`;
    const previous = this._topics.get(topic);
    if (previous) this._stopEntry(previous);
    const entry = { topic, id, seq: null, state: null, onUpdate, onError, poll: null };
    this._topics.set(topic, entry);
    if (this._live) this._subscribe(entry);
    if (this._polling) this._startPoll(entry);
    this._connect();
    return { stop: () => this._unwatch(entry) };
  }

  // Stop everything: the socket, the polls and the timers.
  close() {
    this._closed = true;
    for (const entry of this._topics.values()) this._stopEntry(entry);
    this._topics.clear();
    clearTimeout(this._reconnectTimer);
    this._stopPing();
    if (this._ws) {
      const ws = this._ws;
      this._ws = null;
      ws.onclose = null;
      ws.close(1000, "client closed");
    }
    this._setMode("closed");
  }

  // -- the WebSocket ---------------------------------------------------------

  _connect() {
    if (this._closed || this._ws || this._reconnectTimer) return;
    let ws;
    try {
      ws = new this._WebSocket(this.wsUrl);
    } catch (error) {
      this._failed(false, 1006);
      return;
    }
    this._ws = ws;
    let opened = false;
    ws.onopen = async () => {
      opened = true;
      let token;
      try {
        token = await this._getToken();
      } catch (error) {
        ws.close(4000, "no token");
        return;
      }
      if (this._ws !== ws) return;
      this._failures = 0;
      this._attempt = 0;
      // Frames are answered in order: auth, then the subscriptions.
      ws.send(JSON.stringify({ op: "auth", token }));
      this._live = true;
      this._stopPolling();
      for (const entry of this._topics.values()) this._subscribe(entry);
      this._startPing(ws);
      this._setMode("websocket");
    };
    ws.onmessage = (message) => {
      this._lastHeardAt = Date.now();
      let frame;
      try {
        frame = JSON.parse(message.data);
      } catch (error) {
        return;
      }
      this._onFrame(frame);
    };
    ws.onclose = (event) => {
      if (this._ws !== ws) return;
      this._failed(opened, event.code);
    };
  }

  _failed(opened, code) {
    this._ws = null;
    this._live = false;
    this._stopPing();
    if (this._closed) return;
    if (opened && !reconnectsAfter(code)) {
      this._setMode("stopped");
      for (const entry of [...this._topics.values()]) {
        entry.onError?.({ code: "closed", closeCode: code });
      }
      return;
    }
    if (!opened) this._failures += 1;
    if (this._failures >= this._failuresBeforePolling) this._startPolling();
    else this._setMode("connecting");
    const delay = Math.min(this._maxBackoffMs, this._minBackoffMs * 2 ** this._attempt);
    this._attempt += 1;
    this._reconnectTimer = setTimeout(() => {
      this._reconnectTimer = null;
      this._connect();
    }, delay * (0.5 + Math.random() / 2));
  }

  _subscribe(entry) {
    const frame = { op: "subscribe", topic: entry.topic };
    if (entry.seq !== null) frame.sinceSeq = entry.seq;
    this._ws?.send(JSON.stringify(frame));
  }

  _onFrame(frame) {
    const entry = frame.topic ? this._topics.get(frame.topic) : undefined;
    switch (frame.op) {
      case "subscribed":
      case "reset":
        if (!entry) return;
        if (frame.snapshot) {
          entry.state = frame.snapshot;
          entry.seq = frame.seq;
          entry.onUpdate(entry.state, null);
        }
        return;
      case "event":
        if (!entry || frame.seq === null || entry.state === null) return;
        if (entry.seq !== null && frame.seq <= entry.seq) return;
        entry.state = applyEvent(entry.state, frame);
        entry.seq = frame.seq;
        entry.onUpdate(entry.state, frame);
        return;
      case "error":
        if (entry) {
          this._topics.delete(entry.topic);
          entry.onError?.(frame);
        }
        return;
      default:
        return; // pong, or a frame newer than this client
    }
  }

  // Browsers cannot see protocol pings: send app-level pings and replace a
  // connection that has been silent for an interval plus the pong timeout.
  _startPing(ws) {
    this._stopPing();
    this._lastHeardAt = Date.now();
    this._pingTimer = setInterval(() => {
      if (Date.now() - this._lastHeardAt > this._pingIntervalMs + this._pongTimeoutMs) {
        ws.onclose = null;
        ws.close(4000, "no pong");
        this._failed(true, 4000);
        return;
      }
      ws.send(JSON.stringify({ op: "ping" }));
    }, this._pingIntervalMs);
  }

  _stopPing() {
    clearInterval(this._pingTimer);
    this._pingTimer = null;
  }

  // -- long-polling ------------------------------------------------------------

  _startPolling() {
    this._setMode("polling");
    if (this._polling) return;
    this._polling = true;
    for (const entry of this._topics.values()) this._startPoll(entry);
  }

  _stopPolling() {
    this._polling = false;
    for (const entry of this._topics.values()) {
      entry.poll?.abort();
      entry.poll = null;
    }
  }

  _startPoll(entry) {
    if (entry.poll) return;
    const controller = new AbortController();
    entry.poll = controller;
    this._pollLoop(entry, controller.signal);
  }

  async _pollLoop(entry, signal) {
    let attempt = 0;
    while (!signal.aborted && this._topics.get(entry.topic) === entry) {
      const url =
        `${this.baseUrl}/api/generations/${encodeURIComponent(entry.id)}` +
        `?waitSeconds=${this._pollWaitSeconds}&sinceSeq=${entry.seq ?? 0}`;
      try {
        const token = await this._getToken();
        const response = await this._fetch(url, {
          headers: { Authorization: `Bearer ${token}` },
          signal,
          cache: "no-store",
        });
        if (response.status === 200) {
          const generation = await response.json();
          if (signal.aborted) return;
          entry.state = generation;
          entry.seq = generation.seq;
          entry.onUpdate(generation, null);
          attempt = 0;
        } else if (response.status !== 304) {
          const problem = await response.json().catch(() => ({ status: response.status }));
          if (response.status === 401 || response.status === 403 || response.status === 404) {
            this._topics.delete(entry.topic);
            entry.onError?.(problem);
            return;
          }
          throw new Error(`status ${response.status}`);
        }
      } catch (error) {
        if (signal.aborted) return;
        const delay = Math.min(this._maxBackoffMs, this._minBackoffMs * 2 ** attempt);
        attempt += 1;
        await sleep(delay * (0.5 + Math.random() / 2));
      }
    }
  }

  // -- bookkeeping -------------------------------------------------------------

  _unwatch(entry) {
    if (this._topics.get(entry.topic) !== entry) return;
    this._topics.delete(entry.topic);
    this._stopEntry(entry);
    if (this._live) this._ws?.send(JSON.stringify({ op: "unsubscribe", topic: entry.topic }));
  }

  _stopEntry(entry) {
    entry.poll?.abort();
    entry.poll = null;
  }

  _setMode(mode) {
    if (this.mode === mode) return;
    this.mode = mode;
    this._onStatus(mode);
  }
}
