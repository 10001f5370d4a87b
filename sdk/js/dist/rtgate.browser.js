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
var RecentIds = class {
  constructor(capacity) {
    __publicField(this, "capacity", capacity);
    __publicField(this, "ids", /* @__PURE__ */ new Set());
  }
  has(id) {
    return this.ids.has(id);
  }
  add(id) {
    if (this.capacity <= 0 || this.ids.has(id)) return;
    this.ids.add(id);
    if (this.ids.size > this.capacity) {
      const oldest = this.ids.values().next().value;
      this.ids.delete(oldest);
    }
  }
  clear() {
    this.ids.clear();
  }
  get size() {
    return this.ids.size;
  }
};
var KEY_RE = /^[A-Za-z0-9_.:-]{1,64}$/;
function keyPrefix(random) {
  const c = globalThis.crypto;
  if (c && typeof c.randomUUID === "function") return c.randomUUID().replace(/-/g, "");
  let out = "";
  for (let i = 0; i < 4; i++) out += Math.floor(random() * 4294967296).toString(36);
  return out;
}
var Client = class extends Emitter {
  constructor(url, auth, options = {}) {
    super();
    __publicField(this, "url");
    __publicField(this, "auth");
    __publicField(this, "WS");
    __publicField(this, "ackTimeoutMs");
    __publicField(this, "connectTimeoutMs");
    __publicField(this, "minDelayMs");
    __publicField(this, "maxDelayMs");
    __publicField(this, "bufferLimit");
    __publicField(this, "dedupeWindow");
    __publicField(this, "random");
    __publicField(this, "keyPrefix");
    __publicField(this, "nextKey", 1);
    __publicField(this, "ws", null);
    __publicField(this, "token", null);
    __publicField(this, "refreshToken", true);
    __publicField(this, "attempt", 0);
    __publicField(this, "nextRef", 1);
    __publicField(this, "reconnectTimer");
    __publicField(this, "connectTimer");
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
    this.connectTimeoutMs = options.connectTimeoutMs ?? 1e4;
    this.minDelayMs = options.minDelayMs ?? 250;
    this.maxDelayMs = options.maxDelayMs ?? 1e4;
    this.bufferLimit = options.bufferLimit ?? 1e3;
    this.random = options.random ?? Math.random;
    this.dedupeWindow = options.dedupeWindow ?? 2e3;
    this.keyPrefix = keyPrefix(this.random);
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
    clearTimeout(this.connectTimer);
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
  /**
   * @internal Sends now when synced, else buffers (bounded). With `resend`, a request in flight
   * when the connection drops is sent again on the next one instead of rejecting.
   */
  request(frame, resend = false) {
    if (this.closedByUser) return Promise.reject(new RtgateError("closed", "client closed"));
    return new Promise((resolve, reject) => {
      const entry = { frame, resolve, reject, resend };
      if (this.ready && this.ws) {
        this.transmit(entry);
      } else if (this.buffer.length >= this.bufferLimit) {
        reject(new RtgateError("buffer_full", `send buffer full (${this.bufferLimit})`));
      } else {
        this.buffer.push(entry);
      }
    });
  }
  /** @internal A fresh idempotency key, unique to this client. */
  _newIdempotencyKey() {
    return `${this.keyPrefix}.${(this.nextKey++).toString(36)}`;
  }
  /** @internal Sends on the current socket right away (joins, tracks during resync). */
  requestNow(frame) {
    return new Promise((resolve, reject) => {
      if (!this.ws || !this.welcomed) {
        reject(new RtgateError("disconnected", "not connected"));
        return;
      }
      this.transmit({ frame, resolve, reject });
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
    for (const b of queued) this.transmit(b);
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
  transmit(entry) {
    const { frame, reject } = entry;
    const ws = this.ws;
    const ref = String(this.nextRef++);
    const timer = this.ackTimeoutMs > 0 ? setTimeout(() => {
      if (this.pending.delete(ref)) {
        reject(
          new RtgateError("timeout", `no reply to ${frame.type} within ${this.ackTimeoutMs} ms`)
        );
      }
    }, this.ackTimeoutMs) : void 0;
    this.pending.set(ref, { ...entry, timer });
    try {
      ws.send(JSON.stringify({ ...frame, ref }));
    } catch (e) {
      clearTimeout(timer);
      this.pending.delete(ref);
      if (entry.resend) {
        this.buffer.push(entry);
      } else {
        reject(new RtgateError("disconnected", `send failed: ${String(e)}`));
      }
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
      try {
        ws.close();
      } catch {
      }
      this.onClose(ws, 1006, "connection error");
    };
    if (this.connectTimeoutMs > 0) {
      this.connectTimer = setTimeout(() => {
        if (this.ws === ws && !this.welcomed) this._reconnect("connect timeout");
      }, this.connectTimeoutMs);
    }
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
    clearTimeout(this.connectTimer);
    this.welcome = data;
    this.welcomed = true;
    this.attempt = 0;
    this.emit("welcome", data);
    for (const r of this.rooms.values()) r._resync();
    this._maybeReady();
  }
  onClose(ws, code, reason) {
    if (this.ws !== ws) return;
    clearTimeout(this.connectTimer);
    detach(ws);
    this.ws = null;
    const wasWelcomed = this.welcomed;
    this.welcomed = false;
    this.ready = false;
    const resend = [];
    for (const [ref, p] of this.pending) {
      if (!p.resend) continue;
      this.pending.delete(ref);
      clearTimeout(p.timer);
      resend.push({ frame: p.frame, resolve: p.resolve, reject: p.reject, resend: true });
    }
    this.buffer.unshift(...resend);
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
    /** The highest id delivered to the application. */
    __publicField(this, "lastId");
    /**
     * Every message up to this id was delivered (or reported lost): the `since` of the next
     * join. Equal to `lastId` except while an overflow is being recovered.
     */
    __publicField(this, "resumeFrom");
    /** Recently delivered ids, to drop repeats of ids after `resumeFrom`. */
    __publicField(this, "recent");
    /** From an overflow notice until the join that recovers it settles. */
    __publicField(this, "recovering", false);
    /** An overflow notice arrived while a join was in flight: recover once it settles. */
    __publicField(this, "recoverAgain", false);
    __publicField(this, "meta", null);
    __publicField(this, "presence", {});
    __publicField(this, "joinWaiters", []);
    __publicField(this, "joinInFlight", false);
    __publicField(this, "trackWaiters", []);
    /** True while a (re)join on the current connection has not settled yet. @internal */
    __publicField(this, "_resyncing", false);
    this.client = client;
    this.name = name;
    this.recent = new RecentIds(client.dedupeWindow);
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
          this.resumeFrom = opts.since;
        }
      }
      if (this.client.isWelcomed && !this.joinInFlight) this.sendJoin();
    });
  }
  /**
   * Publishes `data` to the room; resolves with the message id on the server's `ack`. Every
   * send carries an idempotency key, so one in flight when the connection drops is sent again
   * after the reconnect and resolves with the id of the one stored message.
   */
  send(data, opts = {}) {
    const key = opts.idempotencyKey ?? this.client._newIdempotencyKey();
    if (!KEY_RE.test(key)) {
      return Promise.reject(
        new RtgateError("bad_request", "idempotencyKey must be 1-64 bytes of [A-Za-z0-9_.:-]")
      );
    }
    return this.client.request({ type: "message", room: this.name, data, idempotency_key: key }, true).then((d) => ({ id: String(d?.id) }));
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
    this.resumeFrom = void 0;
    this.recent.clear();
    this.recovering = false;
    this.recoverAgain = false;
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
    const since = this.resumeFrom;
    if (since !== void 0) frame.since = since;
    if (!this.self) frame.self = false;
    this.joinInFlight = true;
    this._resyncing = true;
    this.client.requestNow(frame).then(
      () => {
        this.joinInFlight = false;
        this.replayDone();
        this.afterJoin();
        this.settleJoin(null);
      },
      (e) => {
        this.joinInFlight = false;
        if (e.code === "disconnected") return;
        if (e.code === "history_gap") {
          this.emit("gap", { room: this.name, since, message: e.message });
          this.replayDone();
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
  /** A join settled: unless another recovery waits, everything up to `lastId` is in. */
  replayDone() {
    if (this.recoverAgain) return;
    this.recovering = false;
    this.resumeFrom = this.lastId;
  }
  afterJoin() {
    this._resyncing = false;
    if (this.recoverAgain) {
      this.recoverAgain = false;
      this.recover();
      return;
    }
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
  /**
   * Frames of this room were dropped by the server's overflow policy: rejoin from `since` (the
   * last id given before the first drop). The replay re-sends what was delivered after it too;
   * `recent` drops those. Leave and join go out back to back on this connection.
   */
  onOverflow(since) {
    if (this.resumeFrom === void 0 || compareIds(since, this.resumeFrom) < 0) this.resumeFrom = since;
    this.recovering = true;
    if (this.joinInFlight) this.recoverAgain = true;
    else this.recover();
  }
  recover() {
    if (!this.joined || !this.client.isWelcomed) return;
    this.client.requestNow({ type: "leave", room: this.name }).catch(() => {
    });
    this.sendJoin();
  }
  /** @internal A new connection is welcomed: rejoin. */
  _resync() {
    if (!this.joined) return;
    this.joinInFlight = false;
    this.recoverAgain = false;
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
        if (msg.type === "system" && msg.data?.event === "overflow" && typeof msg.data?.since === "string") {
          this.onOverflow(msg.data.since);
          this.emit("system", msg);
          return;
        }
        if (typeof msg.id === "string") {
          if (this.resumeFrom !== void 0 && compareIds(msg.id, this.resumeFrom) <= 0) return;
          if (this.recent.has(msg.id)) return;
          this.recent.add(msg.id);
          if (this.lastId === void 0 || compareIds(msg.id, this.lastId) > 0) this.lastId = msg.id;
          if (!this.recovering) this.resumeFrom = this.lastId;
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
  RecentIds,
  Room,
  RtgateError,
  applyDiff,
  backoffDelay,
  compareIds,
  connect
};
