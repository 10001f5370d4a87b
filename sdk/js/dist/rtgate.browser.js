var __defProp = Object.defineProperty;
var __defNormalProp = (obj, key, value) => key in obj ? __defProp(obj, key, { enumerable: true, configurable: true, writable: true, value }) : obj[key] = value;
var __publicField = (obj, key, value) => __defNormalProp(obj, typeof key !== "symbol" ? key + "" : key, value);

// src/index.ts
var RtgateError = class extends Error {
  constructor(code, message, data) {
    super(message);
    __publicField(this, "code");
    __publicField(this, "data");
    this.name = "RtgateError";
    this.code = code;
    this.data = data;
  }
};
var Emitter = class {
  constructor() {
    __publicField(this, "listeners", /* @__PURE__ */ new Map());
  }
  on(event, cb) {
    let set = this.listeners.get(event);
    if (!set) this.listeners.set(event, set = /* @__PURE__ */ new Set());
    set.add(cb);
    return () => this.off(event, cb);
  }
  off(event, cb) {
    this.listeners.get(event)?.delete(cb);
  }
  emit(event, ...args) {
    const set = this.listeners.get(event);
    if (!set) return;
    for (const cb of [...set]) {
      try {
        cb(...args);
      } catch (e) {
        setTimeout(() => {
          throw e;
        });
      }
    }
  }
};
function compareIds(x, y) {
  const px = parseId(x);
  const py = parseId(y);
  if (!px || !py) return x < y ? -1 : x > y ? 1 : 0;
  if (px[0] !== py[0]) return px[0] < py[0] ? -1 : 1;
  if (px[1] !== py[1]) return px[1] < py[1] ? -1 : 1;
  return 0;
}
function parseId(id) {
  const m = /^(\d+)-(\d+)$/.exec(id);
  if (!m) return null;
  return [BigInt(m[1]), BigInt(m[2])];
}
function backoffDelay(attempt, minDelayMs, maxDelayMs, random = Math.random) {
  const ceiling = Math.min(maxDelayMs, minDelayMs * Math.pow(2, Math.min(attempt, 30)));
  return Math.floor(random() * ceiling);
}
function withToken(url, token) {
  const sep = url.includes("?") ? "&" : "?";
  return `${url}${sep}token=${encodeURIComponent(token)}`;
}
var Client = class extends Emitter {
  constructor(url, auth, options = {}) {
    super();
    __publicField(this, "url");
    __publicField(this, "auth");
    __publicField(this, "WS");
    __publicField(this, "ackTimeoutMs");
    __publicField(this, "minDelayMs");
    __publicField(this, "maxDelayMs");
    __publicField(this, "bufferLimit");
    __publicField(this, "random");
    __publicField(this, "ws", null);
    __publicField(this, "token", null);
    __publicField(this, "refreshToken", true);
    __publicField(this, "attempt", 0);
    __publicField(this, "nextRef", 1);
    __publicField(this, "reconnectTimer");
    __publicField(this, "pending", /* @__PURE__ */ new Map());
    __publicField(this, "buffer", []);
    __publicField(this, "rooms", /* @__PURE__ */ new Map());
    __publicField(this, "welcomed", false);
    __publicField(this, "ready", false);
    __publicField(this, "closedByUser", false);
    __publicField(this, "_state", "connecting");
    /** The `welcome` data of the current connection, if any. */
    __publicField(this, "welcome", null);
    this.url = url;
    this.auth = auth;
    const WS = options.WebSocket ?? globalThis.WebSocket;
    if (!WS) {
      throw new RtgateError(
        "no_websocket",
        "no global WebSocket: pass the `WebSocket` option (e.g. from the `ws` package)"
      );
    }
    this.WS = WS;
    this.ackTimeoutMs = options.ackTimeoutMs ?? 1e4;
    this.minDelayMs = options.minDelayMs ?? 250;
    this.maxDelayMs = options.maxDelayMs ?? 1e4;
    this.bufferLimit = options.bufferLimit ?? 1e3;
    this.random = options.random ?? Math.random;
    if ("token" in auth) this.token = auth.token;
    queueMicrotask(() => {
      if (this.closedByUser) return;
      this.emit("state", "connecting");
      void this.open();
    });
  }
  /** The current connection state. */
  get state() {
    return this._state;
  }
  /** The room handle for `name` (one instance per name). */
  room(name) {
    let r = this.rooms.get(name);
    if (!r) {
      r = new Room(this, name);
      this.rooms.set(name, r);
    }
    return r;
  }
  /** Sends a direct message to every connection of `userId`. Resolves on the server's ack. */
  direct(userId, data = {}) {
    return this.request({ type: "direct", data: { ...data, to: userId } }).then(() => void 0);
  }
  /** Closes the connection (code 1000) and stops reconnecting. */
  close() {
    if (this.closedByUser) return;
    this.closedByUser = true;
    clearTimeout(this.reconnectTimer);
    const ws = this.ws;
    this.ws = null;
    if (ws) {
      detach(ws);
      try {
        ws.close(1e3, "client closed");
      } catch {
      }
    }
    this.ready = false;
    this.welcomed = false;
    const err = () => new RtgateError("closed", "client closed");
    this.failPending(err);
    for (const b of this.buffer.splice(0)) b.reject(err());
    for (const r of this.rooms.values()) r._onClientClosed(err());
    this.setState("closed");
  }
  /* ---------------- internals used by Room ---------------- */
  /** @internal Sends now when synced, else buffers (bounded). */
  request(frame) {
    if (this.closedByUser) return Promise.reject(new RtgateError("closed", "client closed"));
    return new Promise((resolve, reject) => {
      if (this.ready && this.ws) {
        this.transmit(frame, resolve, reject);
      } else if (this.buffer.length >= this.bufferLimit) {
        reject(new RtgateError("buffer_full", `send buffer full (${this.bufferLimit})`));
      } else {
        this.buffer.push({ frame, resolve, reject });
      }
    });
  }
  /** @internal Sends on the current socket right away (joins, tracks during resync). */
  requestNow(frame) {
    return new Promise((resolve, reject) => {
      if (!this.ws || !this.welcomed) {
        reject(new RtgateError("disconnected", "not connected"));
        return;
      }
      this.transmit(frame, resolve, reject);
    });
  }
  /** @internal */
  get isWelcomed() {
    return this.welcomed && this.ws !== null;
  }
  /** @internal */
  get isReady() {
    return this.ready && this.ws !== null;
  }
  /** @internal */
  _emitError(err) {
    this.emit("error", err);
  }
  /** @internal Called by a room after its (re)join settled, to finish the resync. */
  _maybeReady() {
    if (this.ready || !this.welcomed || !this.ws) return;
    for (const r of this.rooms.values()) if (r._resyncing) return;
    this.ready = true;
    const queued = this.buffer.splice(0);
    for (const b of queued) this.transmit(b.frame, b.resolve, b.reject);
    this.setState("open");
  }
  /** @internal Forces a reconnect (e.g. a rejoin that never got its reply). */
  _reconnect(reason) {
    const ws = this.ws;
    if (!ws) return;
    try {
      ws.close(4e3, reason);
    } catch {
    }
    this.onClose(ws, 4e3, reason);
  }
  /* ---------------- connection loop ---------------- */
  transmit(frame, resolve, reject) {
    const ws = this.ws;
    const ref = String(this.nextRef++);
    const timer = this.ackTimeoutMs > 0 ? setTimeout(() => {
      if (this.pending.delete(ref)) {
        reject(
          new RtgateError("timeout", `no reply to ${frame.type} within ${this.ackTimeoutMs} ms`)
        );
      }
    }, this.ackTimeoutMs) : void 0;
    this.pending.set(ref, { resolve, reject, timer });
    try {
      ws.send(JSON.stringify({ ...frame, ref }));
    } catch (e) {
      clearTimeout(timer);
      this.pending.delete(ref);
      reject(new RtgateError("disconnected", `send failed: ${String(e)}`));
    }
  }
  setState(s) {
    if (this._state === s) return;
    this._state = s;
    this.emit("state", s);
  }
  async open() {
    if (this.closedByUser) return;
    if (this._state !== "connecting" && this._state !== "reconnecting") return;
    let token;
    try {
      if ("getToken" in this.auth && (this.refreshToken || this.token === null)) {
        token = await this.auth.getToken();
        this.token = token;
        this.refreshToken = false;
      } else {
        token = this.token;
      }
    } catch (e) {
      this.emit("error", new RtgateError("token", `getToken failed: ${String(e)}`));
      this.scheduleReconnect();
      return;
    }
    if (this.closedByUser) return;
    let ws;
    try {
      ws = new this.WS(withToken(this.url, token));
    } catch (e) {
      this.emit("error", new RtgateError("connect", `WebSocket failed: ${String(e)}`));
      this.scheduleReconnect();
      return;
    }
    this.ws = ws;
    ws.onmessage = (ev) => {
      if (this.ws !== ws) return;
      this.onFrame(ev.data);
    };
    ws.onclose = (ev) => this.onClose(ws, ev?.code ?? 1006, ev?.reason ?? "");
    ws.onerror = () => {
    };
  }
  onFrame(raw) {
    if (typeof raw !== "string") {
      this.emit("error", new RtgateError("bad_frame", "non-text frame from server"));
      return;
    }
    let msg;
    try {
      msg = JSON.parse(raw);
    } catch {
      this.emit("error", new RtgateError("bad_frame", "non-JSON frame from server"));
      return;
    }
    if (!msg || typeof msg !== "object") return;
    const ref = msg.ref === void 0 || msg.ref === null ? void 0 : String(msg.ref);
    switch (msg.type) {
      case "welcome":
        this.onWelcome(msg.data);
        return;
      case "ack":
      case "error": {
        const p = ref !== void 0 ? this.pending.get(ref) : void 0;
        if (p) {
          this.pending.delete(ref);
          clearTimeout(p.timer);
          if (msg.type === "ack") p.resolve(msg.data ?? {});
          else {
            const d = msg.data ?? {};
            p.reject(new RtgateError(d.code ?? "error", d.message ?? "request refused", msg.data));
          }
        } else if (msg.type === "error") {
          const d = msg.data ?? {};
          this.emit("error", new RtgateError(d.code ?? "error", d.message ?? "server error", msg.data));
        }
        return;
      }
      case "direct":
        this.emit("direct", msg);
        return;
      case "pong":
        return;
      case "message":
      case "system":
      case "presence_state":
      case "presence_diff": {
        if (typeof msg.room === "string") {
          const r = this.rooms.get(msg.room);
          if (r) r._onFrame(msg);
        } else if (msg.type === "system") {
          for (const r of this.rooms.values()) if (r.joined) r._onFrame(msg);
        }
        return;
      }
      default:
        return;
    }
  }
  onWelcome(data) {
    this.welcome = data;
    this.welcomed = true;
    this.attempt = 0;
    this.emit("welcome", data);
    for (const r of this.rooms.values()) r._resync();
    this._maybeReady();
  }
  onClose(ws, code, reason) {
    if (this.ws !== ws) return;
    detach(ws);
    this.ws = null;
    const wasWelcomed = this.welcomed;
    this.welcomed = false;
    this.ready = false;
    this.failPending(() => new RtgateError("disconnected", `connection closed (${code}) before the reply`));
    for (const r of this.rooms.values()) r._onDisconnect();
    if (this.closedByUser) return;
    if (code === 1008) {
      if ("getToken" in this.auth) {
        this.refreshToken = true;
      } else if (!wasWelcomed) {
        this.emit("error", new RtgateError("unauthorized", `token refused: ${reason || "policy"}`));
        this.close();
        return;
      }
    }
    this.emit("error", new RtgateError("connection_closed", `connection closed (${code}) ${reason}`.trim()));
    this.scheduleReconnect();
  }
  scheduleReconnect() {
    if (this.closedByUser) return;
    clearTimeout(this.reconnectTimer);
    const delay = backoffDelay(this.attempt, this.minDelayMs, this.maxDelayMs, this.random);
    this.attempt++;
    this.setState("reconnecting");
    this.reconnectTimer = setTimeout(() => {
      void this.open();
    }, delay);
  }
  failPending(err) {
    const pending = [...this.pending.values()];
    this.pending.clear();
    for (const p of pending) {
      clearTimeout(p.timer);
      p.reject(err());
    }
  }
};
function detach(ws) {
  ws.onopen = null;
  ws.onmessage = null;
  ws.onclose = null;
  ws.onerror = null;
}
var Room = class extends Emitter {
  constructor(client, name) {
    super();
    __publicField(this, "name");
    __publicField(this, "client");
    /** True while the application wants this room joined. */
    __publicField(this, "joined", false);
    __publicField(this, "self", true);
    __publicField(this, "lastId");
    __publicField(this, "meta", null);
    __publicField(this, "presence", {});
    __publicField(this, "joinWaiters", []);
    __publicField(this, "joinInFlight", false);
    __publicField(this, "trackWaiters", []);
    /** True while a (re)join on the current connection has not settled yet. @internal */
    __publicField(this, "_resyncing", false);
    this.client = client;
    this.name = name;
  }
  /** The id of the last message delivered to the application. */
  get lastMessageId() {
    return this.lastId;
  }
  /**
   * Joins the room. Resolves on the join `ack` (after replay and `presence_state`), or on a
   * `history_gap` error after emitting `gap`. Rejects with the server's error code otherwise.
   */
  join(opts = {}) {
    return new Promise((resolve, reject) => {
      this.joinWaiters.push({ resolve, reject });
      if (this.joined && !this.joinInFlight && !this._resyncing) {
        this.settleJoin(null);
        return;
      }
      if (!this.joined) {
        this.joined = true;
        this.self = opts.self ?? true;
        if (opts.since !== void 0 && (this.lastId === void 0 || compareIds(opts.since, this.lastId) > 0)) {
          this.lastId = opts.since;
        }
      }
      if (this.client.isWelcomed && !this.joinInFlight) this.sendJoin();
    });
  }
  /** Publishes `data` to the room; resolves with the message id on the server's `ack`. */
  send(data) {
    return this.client.request({ type: "message", room: this.name, data }).then((d) => ({ id: String(d?.id) }));
  }
  /** Sets this connection's presence meta (re-sent after every rejoin). */
  track(meta = {}) {
    this.meta = meta;
    if (!this.joined) return Promise.reject(new RtgateError("not_joined", "join the room before track"));
    if (this.client.isReady && !this._resyncing) {
      return this.client.requestNow({ type: "track", room: this.name, data: meta }).then(() => void 0);
    }
    return new Promise((resolve, reject) => this.trackWaiters.push({ resolve, reject }));
  }
  /** Removes this connection's presence meta. */
  untrack() {
    this.meta = null;
    if (this.joined && this.client.isReady && !this._resyncing) {
      return this.client.requestNow({ type: "untrack", room: this.name, data: {} }).then(() => void 0);
    }
    return Promise.resolve();
  }
  /** Current presence: user id -> metas (from `presence_state` and `presence_diff`). */
  presenceState() {
    const copy = {};
    for (const [k, v] of Object.entries(this.presence)) copy[k] = v.map((m) => ({ ...m }));
    return copy;
  }
  /** Leaves the room; it is no longer rejoined after a reconnect. */
  leave() {
    const wasJoined = this.joined;
    this.joined = false;
    this.meta = null;
    this.presence = {};
    this.lastId = void 0;
    this._resyncing = false;
    this.rejectJoin(new RtgateError("left", "room left before the join completed"));
    this.settleTracks(new RtgateError("left", "room left before the track was sent"));
    this.client._maybeReady();
    if (wasJoined && this.client.isWelcomed) {
      return this.client.requestNow({ type: "leave", room: this.name }).then(
        () => void 0,
        (e) => {
          if (e.code !== "disconnected") throw e;
        }
      );
    }
    return Promise.resolve();
  }
  /* ---------------- internals ---------------- */
  sendJoin() {
    const frame = { type: "join", room: this.name };
    const since = this.lastId;
    if (since !== void 0) frame.since = since;
    if (!this.self) frame.self = false;
    this.joinInFlight = true;
    this._resyncing = true;
    this.client.requestNow(frame).then(
      () => {
        this.joinInFlight = false;
        this.afterJoin();
        this.settleJoin(null);
      },
      (e) => {
        this.joinInFlight = false;
        if (e.code === "disconnected") return;
        if (e.code === "history_gap") {
          this.emit("gap", { room: this.name, since, message: e.message });
          this.afterJoin();
          this.settleJoin(null);
          return;
        }
        if (e.code === "timeout") {
          this.client._emitError(new RtgateError("timeout", `join ${this.name}: no reply`));
          this.client._reconnect("join timeout");
          return;
        }
        if (e.code === "unavailable" || e.code === "rate_limited") {
          this.client._emitError(e);
          setTimeout(() => {
            if (this.joined && this.client.isWelcomed && !this.joinInFlight) this.sendJoin();
          }, this.client.minDelayMs);
          return;
        }
        this.joined = false;
        this._resyncing = false;
        this.client._emitError(e);
        this.settleJoin(e);
        this.client._maybeReady();
      }
    );
  }
  afterJoin() {
    this._resyncing = false;
    if (this.meta && this.joined) {
      this.client.requestNow({ type: "track", room: this.name, data: this.meta }).then(
        () => this.settleTracks(null),
        (e) => {
          if (e.code === "disconnected") return;
          this.client._emitError(e);
          this.settleTracks(e);
        }
      );
    } else {
      this.settleTracks(null);
    }
    this.client._maybeReady();
  }
  settleTracks(err) {
    const waiters = this.trackWaiters.splice(0);
    for (const w of waiters) err ? w.reject(err) : w.resolve();
  }
  settleJoin(err) {
    const waiters = this.joinWaiters.splice(0);
    for (const w of waiters) err ? w.reject(err) : w.resolve();
  }
  rejectJoin(err) {
    const waiters = this.joinWaiters.splice(0);
    for (const w of waiters) w.reject(err);
  }
  /** @internal A new connection is welcomed: rejoin. */
  _resync() {
    if (!this.joined) return;
    this.joinInFlight = false;
    this.sendJoin();
  }
  /** @internal */
  _onDisconnect() {
    this.joinInFlight = false;
    if (this.joined) this._resyncing = true;
  }
  /** @internal */
  _onClientClosed(err) {
    this.rejectJoin(err);
    this.settleTracks(err);
    this.joined = false;
    this._resyncing = false;
  }
  /** @internal */
  _onFrame(msg) {
    if (!this.joined) return;
    switch (msg.type) {
      case "message":
      case "system": {
        if (typeof msg.id === "string") {
          if (this.lastId !== void 0 && compareIds(msg.id, this.lastId) <= 0) return;
          this.lastId = msg.id;
        }
        this.emit(msg.type, msg);
        return;
      }
      case "presence_state": {
        this.presence = normalize(msg.data);
        this.emit("presence", { kind: "state", state: this.presenceState() });
        return;
      }
      case "presence_diff": {
        const joins = normalize(msg.data?.joins);
        const leaves = normalize(msg.data?.leaves);
        applyDiff(this.presence, joins, leaves);
        this.emit("presence", { kind: "diff", state: this.presenceState(), joins, leaves });
        return;
      }
    }
  }
};
function normalize(data) {
  const out = {};
  if (!data || typeof data !== "object") return out;
  for (const [user, metas] of Object.entries(data)) {
    if (Array.isArray(metas)) out[user] = metas.filter((m) => m && typeof m === "object");
  }
  return out;
}
function sameMeta(a, b) {
  if (typeof a.session_id === "string" && typeof b.session_id === "string") {
    return a.session_id === b.session_id;
  }
  return JSON.stringify(a) === JSON.stringify(b);
}
function applyDiff(state, joins, leaves) {
  for (const [user, metas] of Object.entries(leaves)) {
    const cur = state[user];
    if (!cur) continue;
    const rest = cur.filter((m) => !metas.some((l) => sameMeta(m, l)));
    if (rest.length) state[user] = rest;
    else delete state[user];
  }
  for (const [user, metas] of Object.entries(joins)) {
    const cur = state[user] ?? (state[user] = []);
    for (const m of metas) {
      const i = cur.findIndex((c) => sameMeta(c, m));
      if (i >= 0) cur[i] = m;
      else cur.push(m);
    }
  }
  return state;
}
function connect(url, auth, options = {}) {
  return new Client(url, auth, options);
}
export {
  Client,
  Room,
  RtgateError,
  applyDiff,
  backoffDelay,
  compareIds,
  connect
};
