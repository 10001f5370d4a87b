/**
 * rtgate client SDK (wire protocol v1): browsers and Node 20.
 * No runtime dependencies.
 */

export type Json = null | boolean | number | string | Json[] | { [key: string]: Json };
export type JsonObject = { [key: string]: Json };

/** Every WebSocket text frame, both directions. */
export interface Envelope {
  type: string;
  room?: string | null;
  data?: any;
  ts?: string;
  sender_id?: string;
  id?: string;
  ref?: string;
  [extra: string]: unknown;
}

export type ConnectionState = "connecting" | "open" | "reconnecting" | "closed";

/** The subset of the standard WebSocket API the client uses. */
export interface WebSocketLike {
  readonly readyState: number;
  onopen: ((ev: any) => any) | null;
  onmessage: ((ev: { data: any }) => any) | null;
  onclose: ((ev: { code: number; reason: string }) => any) | null;
  onerror: ((ev: any) => any) | null;
  send(data: string): void;
  close(code?: number, reason?: string): void;
}

export type WebSocketConstructor = new (url: string) => WebSocketLike;

export type Auth = { token: string } | { getToken: () => Promise<string> };

export interface ConnectOptions {
  /** WebSocket constructor; defaults to `globalThis.WebSocket` (e.g. pass `ws` in Node 20). */
  WebSocket?: WebSocketConstructor;
  /** How long a request waits for its `ack`/`error` once written (default 10000). */
  ackTimeoutMs?: number;
  /** How long a connection attempt may take until `welcome` before it is abandoned and retried (default 10000). */
  connectTimeoutMs?: number;
  /** Reconnect backoff base (default 250). */
  minDelayMs?: number;
  /** Reconnect backoff cap (default 10000). */
  maxDelayMs?: number;
  /** Requests kept while disconnected (default 1000); beyond it they reject with `buffer_full`. */
  bufferLimit?: number;
  /** Random source in [0, 1) for the backoff jitter (tests). */
  random?: () => number;
  /**
   * Ids remembered per room to drop duplicates while an overflow is recovered (default 2000).
   * A recovery replays from before ids already delivered; those are recognised by this set.
   */
  dedupeWindow?: number;
}

export interface SendOptions {
  /**
   * The idempotency key (1-64 bytes of `[A-Za-z0-9_.:-]`). By default each `send` gets a fresh
   * one. Pass your own to retry a send that failed with `timeout` or `unavailable`: a repeat
   * within the server's idempotency window is acked with the first message's id.
   */
  idempotencyKey?: string;
}

/** An error carrying a machine-readable `code` (the server's `error.data.code`, or a client code). */
export class RtgateError extends Error {
  readonly code: string;
  readonly data?: unknown;
  constructor(code: string, message: string, data?: unknown) {
    super(message);
    this.name = "RtgateError";
    this.code = code;
    this.data = data;
  }
}

export interface PresenceEvent {
  /** `state` for a `presence_state` frame, `diff` for a `presence_diff` frame. */
  kind: "state" | "diff";
  /** The room's presence after applying the frame: user id -> metas. */
  state: PresenceMap;
  joins?: PresenceMap;
  leaves?: PresenceMap;
}
export type PresenceMap = Record<string, JsonObject[]>;

export interface GapEvent {
  room: string;
  since: string | undefined;
  message: string;
}

export interface WelcomeData {
  user_id: string;
  instance_id: string;
  session_id: string;
}

/* ----------------------------------------------------------------------------------------- */

type Listener = (...args: any[]) => void;

class Emitter<Events extends Record<string, Listener>> {
  private listeners = new Map<keyof Events, Set<Listener>>();

  on<K extends keyof Events>(event: K, cb: Events[K]): () => void {
    let set = this.listeners.get(event);
    if (!set) this.listeners.set(event, (set = new Set()));
    set.add(cb);
    return () => this.off(event, cb);
  }

  off<K extends keyof Events>(event: K, cb: Events[K]): void {
    this.listeners.get(event)?.delete(cb);
  }

  protected emit<K extends keyof Events>(event: K, ...args: Parameters<Events[K]>): void {
    const set = this.listeners.get(event);
    if (!set) return;
    for (const cb of [...set]) {
      try {
        cb(...args);
      } catch (e) {
        // A throwing listener must not break the connection loop.
        setTimeout(() => {
          throw e;
        });
      }
    }
  }
}

/* ----------------------------------------------------------------------------------------- */

/**
 * Compares two message ids `<a>-<b>` by their numeric parts.
 * Returns negative, 0 or positive. Ids that do not parse compare as strings.
 */
export function compareIds(x: string, y: string): number {
  const px = parseId(x);
  const py = parseId(y);
  if (!px || !py) return x < y ? -1 : x > y ? 1 : 0;
  if (px[0] !== py[0]) return px[0] < py[0] ? -1 : 1;
  if (px[1] !== py[1]) return px[1] < py[1] ? -1 : 1;
  return 0;
}

function parseId(id: string): [bigint, bigint] | null {
  const m = /^(\d+)-(\d+)$/.exec(id);
  if (!m) return null;
  return [BigInt(m[1]!), BigInt(m[2]!)];
}

/**
 * Reconnect delay for attempt `attempt` (0-based): full jitter,
 * `random() * min(maxDelayMs, minDelayMs * 2^attempt)`.
 */
export function backoffDelay(
  attempt: number,
  minDelayMs: number,
  maxDelayMs: number,
  random: () => number = Math.random,
): number {
  const ceiling = Math.min(maxDelayMs, minDelayMs * Math.pow(2, Math.min(attempt, 30)));
  return Math.floor(random() * ceiling);
}

function withToken(url: string, token: string): string {
  const sep = url.includes("?") ? "&" : "?";
  return `${url}${sep}token=${encodeURIComponent(token)}`;
}

/** A bounded set of the most recently added ids (oldest evicted first). */
export class RecentIds {
  private readonly ids = new Set<string>();
  constructor(readonly capacity: number) {}
  has(id: string): boolean {
    return this.ids.has(id);
  }
  add(id: string): void {
    if (this.capacity <= 0 || this.ids.has(id)) return;
    this.ids.add(id);
    if (this.ids.size > this.capacity) {
      // Sets iterate in insertion order: the first is the oldest.
      const oldest = this.ids.values().next().value as string;
      this.ids.delete(oldest);
    }
  }
  clear(): void {
    this.ids.clear();
  }
  get size(): number {
    return this.ids.size;
  }
}

const KEY_RE = /^[A-Za-z0-9_.:-]{1,64}$/;

/** A random prefix that makes this client's idempotency keys unique across clients. */
function keyPrefix(random: () => number): string {
  const c = (globalThis as any).crypto;
  if (c && typeof c.randomUUID === "function") return (c.randomUUID() as string).replace(/-/g, "");
  let out = "";
  for (let i = 0; i < 4; i++) out += Math.floor(random() * 0x1_0000_0000).toString(36);
  return out;
}

/* ----------------------------------------------------------------------------------------- */

interface Buffered {
  frame: Envelope;
  resolve: (data: any) => void;
  reject: (err: Error) => void;
  /** Safe to send again after a reconnect (it carries an idempotency key). */
  resend?: boolean;
}

interface Pending extends Buffered {
  timer: ReturnType<typeof setTimeout> | undefined;
}

type ClientEvents = {
  direct: (msg: Envelope) => void;
  state: (state: ConnectionState) => void;
  error: (err: Error) => void;
  welcome: (data: WelcomeData) => void;
};

export class Client extends Emitter<ClientEvents> {
  private readonly url: string;
  private readonly auth: Auth;
  private readonly WS: WebSocketConstructor;
  readonly ackTimeoutMs: number;
  readonly connectTimeoutMs: number;
  readonly minDelayMs: number;
  readonly maxDelayMs: number;
  readonly bufferLimit: number;
  readonly dedupeWindow: number;
  private readonly random: () => number;
  private readonly keyPrefix: string;
  private nextKey = 1;

  private ws: WebSocketLike | null = null;
  private token: string | null = null;
  private refreshToken = true;
  private attempt = 0;
  private nextRef = 1;
  private reconnectTimer: ReturnType<typeof setTimeout> | undefined;
  private connectTimer: ReturnType<typeof setTimeout> | undefined;
  private pending = new Map<string, Pending>();
  private buffer: Buffered[] = [];
  private rooms = new Map<string, Room>();
  private welcomed = false;
  private ready = false;
  private closedByUser = false;
  private _state: ConnectionState = "connecting";
  /** The `welcome` data of the current connection, if any. */
  welcome: WelcomeData | null = null;

  constructor(url: string, auth: Auth, options: ConnectOptions = {}) {
    super();
    this.url = url;
    this.auth = auth;
    const WS = options.WebSocket ?? (globalThis as any).WebSocket;
    if (!WS) {
      throw new RtgateError(
        "no_websocket",
        "no global WebSocket: pass the `WebSocket` option (e.g. from the `ws` package)",
      );
    }
    this.WS = WS;
    this.ackTimeoutMs = options.ackTimeoutMs ?? 10_000;
    this.connectTimeoutMs = options.connectTimeoutMs ?? 10_000;
    this.minDelayMs = options.minDelayMs ?? 250;
    this.maxDelayMs = options.maxDelayMs ?? 10_000;
    this.bufferLimit = options.bufferLimit ?? 1000;
    this.random = options.random ?? Math.random;
    this.dedupeWindow = options.dedupeWindow ?? 2000;
    this.keyPrefix = keyPrefix(this.random);
    if ("token" in auth) this.token = auth.token;
    // Let the caller attach listeners before the first state change.
    queueMicrotask(() => {
      if (this.closedByUser) return;
      this.emit("state", "connecting");
      void this.open();
    });
  }

  /** The current connection state. */
  get state(): ConnectionState {
    return this._state;
  }

  /** The room handle for `name` (one instance per name). */
  room(name: string): Room {
    let r = this.rooms.get(name);
    if (!r) {
      r = new Room(this, name);
      this.rooms.set(name, r);
    }
    return r;
  }

  /** Sends a direct message to every connection of `userId`. Resolves on the server's ack. */
  direct(userId: string, data: JsonObject = {}): Promise<void> {
    return this.request({ type: "direct", data: { ...data, to: userId } }).then(() => undefined);
  }

  /** Closes the connection (code 1000) and stops reconnecting. */
  close(): void {
    if (this.closedByUser) return;
    this.closedByUser = true;
    clearTimeout(this.reconnectTimer);
    clearTimeout(this.connectTimer);
    const ws = this.ws;
    this.ws = null;
    if (ws) {
      detach(ws);
      try {
        ws.close(1000, "client closed");
      } catch {
        /* ignore */
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
  request(frame: Envelope, resend = false): Promise<any> {
    if (this.closedByUser) return Promise.reject(new RtgateError("closed", "client closed"));
    return new Promise((resolve, reject) => {
      const entry: Buffered = { frame, resolve, reject, resend };
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
  _newIdempotencyKey(): string {
    return `${this.keyPrefix}.${(this.nextKey++).toString(36)}`;
  }

  /** @internal Sends on the current socket right away (joins, tracks during resync). */
  requestNow(frame: Envelope): Promise<any> {
    return new Promise((resolve, reject) => {
      if (!this.ws || !this.welcomed) {
        reject(new RtgateError("disconnected", "not connected"));
        return;
      }
      this.transmit({ frame, resolve, reject });
    });
  }

  /** @internal */
  get isWelcomed(): boolean {
    return this.welcomed && this.ws !== null;
  }

  /** @internal */
  get isReady(): boolean {
    return this.ready && this.ws !== null;
  }

  /** @internal */
  _emitError(err: Error): void {
    this.emit("error", err);
  }

  /** @internal Called by a room after its (re)join settled, to finish the resync. */
  _maybeReady(): void {
    if (this.ready || !this.welcomed || !this.ws) return;
    for (const r of this.rooms.values()) if (r._resyncing) return;
    this.ready = true;
    const queued = this.buffer.splice(0);
    for (const b of queued) this.transmit(b);
    this.setState("open");
  }

  /** @internal Forces a reconnect (e.g. a rejoin that never got its reply). */
  _reconnect(reason: string): void {
    const ws = this.ws;
    if (!ws) return;
    try {
      ws.close(4000, reason);
    } catch {
      /* ignore */
    }
    this.onClose(ws, 4000, reason);
  }

  /* ---------------- connection loop ---------------- */

  private transmit(entry: Buffered): void {
    const { frame, reject } = entry;
    const ws = this.ws!;
    const ref = String(this.nextRef++);
    const timer =
      this.ackTimeoutMs > 0
        ? setTimeout(() => {
            if (this.pending.delete(ref)) {
              reject(
                new RtgateError("timeout", `no reply to ${frame.type} within ${this.ackTimeoutMs} ms`),
              );
            }
          }, this.ackTimeoutMs)
        : undefined;
    this.pending.set(ref, { ...entry, timer });
    try {
      ws.send(JSON.stringify({ ...frame, ref }));
    } catch (e) {
      clearTimeout(timer);
      this.pending.delete(ref);
      if (entry.resend) {
        // The socket is going away: sent again on the next connection.
        this.buffer.push(entry);
      } else {
        reject(new RtgateError("disconnected", `send failed: ${String(e)}`));
      }
    }
  }

  private setState(s: ConnectionState): void {
    if (this._state === s) return;
    this._state = s;
    this.emit("state", s);
  }

  private async open(): Promise<void> {
    if (this.closedByUser) return;
    if (this._state !== "connecting" && this._state !== "reconnecting") return;
    let token: string;
    try {
      if ("getToken" in this.auth && (this.refreshToken || this.token === null)) {
        token = await this.auth.getToken();
        this.token = token;
        this.refreshToken = false;
      } else {
        token = this.token!;
      }
    } catch (e) {
      this.emit("error", new RtgateError("token", `getToken failed: ${String(e)}`));
      this.scheduleReconnect();
      return;
    }
    if (this.closedByUser) return;
    let ws: WebSocketLike;
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
    // Browsers follow an error with a close event; some implementations (Node 20's) do not
    // when the connection is refused. Either way the socket is done: close it here.
    ws.onerror = () => {
      try {
        ws.close();
      } catch {
        /* ignore */
      }
      this.onClose(ws, 1006, "connection error");
    };
    if (this.connectTimeoutMs > 0) {
      this.connectTimer = setTimeout(() => {
        if (this.ws === ws && !this.welcomed) this._reconnect("connect timeout");
      }, this.connectTimeoutMs);
    }
  }

  private onFrame(raw: unknown): void {
    if (typeof raw !== "string") {
      this.emit("error", new RtgateError("bad_frame", "non-text frame from server"));
      return;
    }
    let msg: Envelope;
    try {
      msg = JSON.parse(raw);
    } catch {
      this.emit("error", new RtgateError("bad_frame", "non-JSON frame from server"));
      return;
    }
    if (!msg || typeof msg !== "object") return;
    const ref = msg.ref === undefined || msg.ref === null ? undefined : String(msg.ref);
    switch (msg.type) {
      case "welcome":
        this.onWelcome(msg.data as WelcomeData);
        return;
      case "ack":
      case "error": {
        const p = ref !== undefined ? this.pending.get(ref) : undefined;
        if (p) {
          this.pending.delete(ref!);
          clearTimeout(p.timer);
          if (msg.type === "ack") p.resolve(msg.data ?? {});
          else {
            const d = (msg.data ?? {}) as { code?: string; message?: string };
            p.reject(new RtgateError(d.code ?? "error", d.message ?? "request refused", msg.data));
          }
        } else if (msg.type === "error") {
          const d = (msg.data ?? {}) as { code?: string; message?: string };
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
          // A room-less notice (e.g. draining).
          for (const r of this.rooms.values()) if (r.joined) r._onFrame(msg);
        }
        return;
      }
      default:
        return; // unknown types are ignored (additive protocol)
    }
  }

  private onWelcome(data: WelcomeData): void {
    clearTimeout(this.connectTimer);
    this.welcome = data;
    this.welcomed = true;
    this.attempt = 0;
    this.emit("welcome", data);
    for (const r of this.rooms.values()) r._resync();
    this._maybeReady();
  }

  private onClose(ws: WebSocketLike, code: number, reason: string): void {
    if (this.ws !== ws) return;
    clearTimeout(this.connectTimer);
    detach(ws);
    this.ws = null;
    const wasWelcomed = this.welcomed;
    this.welcomed = false;
    this.ready = false;
    // Keyed sends go again, first and in their order, on the next connection: a repeat is
    // acked with the id of the copy that may already be stored, never published twice.
    const resend: Buffered[] = [];
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
        // A fixed token the server refuses: retrying cannot help.
        this.emit("error", new RtgateError("unauthorized", `token refused: ${reason || "policy"}`));
        this.close();
        return;
      }
    }
    this.emit("error", new RtgateError("connection_closed", `connection closed (${code}) ${reason}`.trim()));
    this.scheduleReconnect();
  }

  private scheduleReconnect(): void {
    if (this.closedByUser) return;
    clearTimeout(this.reconnectTimer);
    const delay = backoffDelay(this.attempt, this.minDelayMs, this.maxDelayMs, this.random);
    this.attempt++;
    this.setState("reconnecting");
    this.reconnectTimer = setTimeout(() => {
      void this.open();
    }, delay);
  }

  private failPending(err: () => Error): void {
    const pending = [...this.pending.values()];
    this.pending.clear();
    for (const p of pending) {
      clearTimeout(p.timer);
      p.reject(err());
    }
  }
}

function detach(ws: WebSocketLike): void {
  ws.onopen = null;
  ws.onmessage = null;
  ws.onclose = null;
  ws.onerror = null;
}

/* ----------------------------------------------------------------------------------------- */

type RoomEvents = {
  message: (msg: Envelope) => void;
  presence: (ev: PresenceEvent) => void;
  system: (msg: Envelope) => void;
  gap: (ev: GapEvent) => void;
};

export interface JoinOptions {
  /** Replay every message after this id first. */
  since?: string;
  /** Receive own messages (default true). */
  self?: boolean;
}

export class Room extends Emitter<RoomEvents> {
  readonly name: string;
  private readonly client: Client;
  /** True while the application wants this room joined. */
  joined = false;
  private self = true;
  /** The highest id delivered to the application. */
  private lastId: string | undefined;
  /**
   * Every message up to this id was delivered (or reported lost): the `since` of the next
   * join. Equal to `lastId` except while an overflow is being recovered.
   */
  private resumeFrom: string | undefined;
  /** Recently delivered ids, to drop repeats of ids after `resumeFrom`. */
  private readonly recent: RecentIds;
  /** From an overflow notice until the join that recovers it settles. */
  private recovering = false;
  /** An overflow notice arrived while a join was in flight: recover once it settles. */
  private recoverAgain = false;
  private meta: JsonObject | null = null;
  private presence: PresenceMap = {};
  private joinWaiters: { resolve: () => void; reject: (e: Error) => void }[] = [];
  private joinInFlight = false;
  private trackWaiters: { resolve: () => void; reject: (e: Error) => void }[] = [];
  /** True while a (re)join on the current connection has not settled yet. @internal */
  _resyncing = false;

  constructor(client: Client, name: string) {
    super();
    this.client = client;
    this.name = name;
    this.recent = new RecentIds(client.dedupeWindow);
  }

  /** The id of the last message delivered to the application. */
  get lastMessageId(): string | undefined {
    return this.lastId;
  }

  /**
   * Joins the room. Resolves on the join `ack` (after replay and `presence_state`), or on a
   * `history_gap` error after emitting `gap`. Rejects with the server's error code otherwise.
   */
  join(opts: JoinOptions = {}): Promise<void> {
    return new Promise((resolve, reject) => {
      this.joinWaiters.push({ resolve, reject });
      if (this.joined && !this.joinInFlight && !this._resyncing) {
        // Already joined on this connection.
        this.settleJoin(null);
        return;
      }
      if (!this.joined) {
        this.joined = true;
        this.self = opts.self ?? true;
        if (opts.since !== undefined && (this.lastId === undefined || compareIds(opts.since, this.lastId) > 0)) {
          this.lastId = opts.since;
          this.resumeFrom = opts.since;
        }
      }
      if (this.client.isWelcomed && !this.joinInFlight) this.sendJoin();
      // else: sent by _resync() once the connection is up.
    });
  }

  /**
   * Publishes `data` to the room; resolves with the message id on the server's `ack`. Every
   * send carries an idempotency key, so one in flight when the connection drops is sent again
   * after the reconnect and resolves with the id of the one stored message.
   */
  send(data: JsonObject, opts: SendOptions = {}): Promise<{ id: string }> {
    const key = opts.idempotencyKey ?? this.client._newIdempotencyKey();
    if (!KEY_RE.test(key)) {
      return Promise.reject(
        new RtgateError("bad_request", "idempotencyKey must be 1-64 bytes of [A-Za-z0-9_.:-]"),
      );
    }
    return this.client
      .request({ type: "message", room: this.name, data, idempotency_key: key }, true)
      .then((d: any) => ({ id: String(d?.id) }));
  }

  /** Sets this connection's presence meta (re-sent after every rejoin). */
  track(meta: JsonObject = {}): Promise<void> {
    this.meta = meta;
    if (!this.joined) return Promise.reject(new RtgateError("not_joined", "join the room before track"));
    if (this.client.isReady && !this._resyncing) {
      return this.client.requestNow({ type: "track", room: this.name, data: meta }).then(() => undefined);
    }
    // Sent once the (re)join is acked; settles with that track's reply.
    return new Promise((resolve, reject) => this.trackWaiters.push({ resolve, reject }));
  }

  /** Removes this connection's presence meta. */
  untrack(): Promise<void> {
    this.meta = null;
    if (this.joined && this.client.isReady && !this._resyncing) {
      return this.client.requestNow({ type: "untrack", room: this.name, data: {} }).then(() => undefined);
    }
    return Promise.resolve();
  }

  /** Current presence: user id -> metas (from `presence_state` and `presence_diff`). */
  presenceState(): PresenceMap {
    const copy: PresenceMap = {};
    for (const [k, v] of Object.entries(this.presence)) copy[k] = v.map((m) => ({ ...m }));
    return copy;
  }

  /** Leaves the room; it is no longer rejoined after a reconnect. */
  leave(): Promise<void> {
    const wasJoined = this.joined;
    this.joined = false;
    this.meta = null;
    this.presence = {};
    this.lastId = undefined;
    this.resumeFrom = undefined;
    this.recent.clear();
    this.recovering = false;
    this.recoverAgain = false;
    this._resyncing = false;
    this.rejectJoin(new RtgateError("left", "room left before the join completed"));
    this.settleTracks(new RtgateError("left", "room left before the track was sent"));
    this.client._maybeReady();
    if (wasJoined && this.client.isWelcomed) {
      return this.client.requestNow({ type: "leave", room: this.name }).then(
        () => undefined,
        (e: RtgateError) => {
          if (e.code !== "disconnected") throw e;
        },
      );
    }
    return Promise.resolve();
  }

  /* ---------------- internals ---------------- */

  private sendJoin(): void {
    const frame: Envelope = { type: "join", room: this.name };
    const since = this.resumeFrom;
    if (since !== undefined) frame.since = since;
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
      (e: RtgateError) => {
        this.joinInFlight = false;
        if (e.code === "disconnected") return; // retried by _resync on the next connection
        if (e.code === "history_gap") {
          this.emit("gap", { room: this.name, since, message: e.message });
          this.replayDone();
          this.afterJoin();
          this.settleJoin(null);
          return;
        }
        if (e.code === "timeout") {
          // The connection is not answering: start over on a new one.
          this.client._emitError(new RtgateError("timeout", `join ${this.name}: no reply`));
          this.client._reconnect("join timeout");
          return;
        }
        if (e.code === "unavailable" || e.code === "rate_limited") {
          // Transient: try again shortly on this connection.
          this.client._emitError(e);
          setTimeout(() => {
            if (this.joined && this.client.isWelcomed && !this.joinInFlight) this.sendJoin();
          }, this.client.minDelayMs);
          return;
        }
        // forbidden, bad_request...: the room cannot be joined.
        this.joined = false;
        this._resyncing = false;
        this.client._emitError(e);
        this.settleJoin(e);
        this.client._maybeReady();
      },
    );
  }

  /** A join settled: unless another recovery waits, everything up to `lastId` is in. */
  private replayDone(): void {
    if (this.recoverAgain) return;
    this.recovering = false;
    this.resumeFrom = this.lastId;
  }

  private afterJoin(): void {
    this._resyncing = false;
    if (this.recoverAgain) {
      this.recoverAgain = false;
      this.recover();
      return;
    }
    if (this.meta && this.joined) {
      this.client.requestNow({ type: "track", room: this.name, data: this.meta }).then(
        () => this.settleTracks(null),
        (e: RtgateError) => {
          if (e.code === "disconnected") return; // re-tracked after the next rejoin
          this.client._emitError(e);
          this.settleTracks(e);
        },
      );
    } else {
      this.settleTracks(null);
    }
    this.client._maybeReady();
  }

  private settleTracks(err: Error | null): void {
    const waiters = this.trackWaiters.splice(0);
    for (const w of waiters) (err ? w.reject(err) : w.resolve());
  }

  private settleJoin(err: Error | null): void {
    const waiters = this.joinWaiters.splice(0);
    for (const w of waiters) (err ? w.reject(err) : w.resolve());
  }

  private rejectJoin(err: Error): void {
    const waiters = this.joinWaiters.splice(0);
    for (const w of waiters) w.reject(err);
  }

  /**
   * Frames of this room were dropped by the server's overflow policy: rejoin from `since` (the
   * last id given before the first drop). The replay re-sends what was delivered after it too;
   * `recent` drops those. Leave and join go out back to back on this connection.
   */
  private onOverflow(since: string): void {
    if (this.resumeFrom === undefined || compareIds(since, this.resumeFrom) < 0) this.resumeFrom = since;
    this.recovering = true;
    if (this.joinInFlight) this.recoverAgain = true; // that join may start after `since`
    else this.recover(); // disconnected: the next rejoin starts from resumeFrom
  }

  private recover(): void {
    if (!this.joined || !this.client.isWelcomed) return; // the next connection's rejoin recovers
    this.client.requestNow({ type: "leave", room: this.name }).catch(() => {
      /* a dropped connection rejoins from resumeFrom anyway */
    });
    this.sendJoin();
  }

  /** @internal A new connection is welcomed: rejoin. */
  _resync(): void {
    if (!this.joined) return;
    this.joinInFlight = false;
    this.recoverAgain = false; // this join starts from resumeFrom, which covers it
    this.sendJoin();
  }

  /** @internal */
  _onDisconnect(): void {
    this.joinInFlight = false;
    if (this.joined) this._resyncing = true;
  }

  /** @internal */
  _onClientClosed(err: Error): void {
    this.rejectJoin(err);
    this.settleTracks(err);
    this.joined = false;
    this._resyncing = false;
  }

  /** @internal */
  _onFrame(msg: Envelope): void {
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
          if (this.resumeFrom !== undefined && compareIds(msg.id, this.resumeFrom) <= 0) return; // duplicate
          if (this.recent.has(msg.id)) return; // duplicate (recovery replay)
          this.recent.add(msg.id);
          if (this.lastId === undefined || compareIds(msg.id, this.lastId) > 0) this.lastId = msg.id;
          // While an overflow is recovered, ids after the notice may skip dropped ones.
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
}

function normalize(data: unknown): PresenceMap {
  const out: PresenceMap = {};
  if (!data || typeof data !== "object") return out;
  for (const [user, metas] of Object.entries(data as Record<string, unknown>)) {
    if (Array.isArray(metas)) out[user] = metas.filter((m) => m && typeof m === "object") as JsonObject[];
  }
  return out;
}

function sameMeta(a: JsonObject, b: JsonObject): boolean {
  if (typeof a.session_id === "string" && typeof b.session_id === "string") {
    return a.session_id === b.session_id;
  }
  return JSON.stringify(a) === JSON.stringify(b);
}

/** Applies a presence diff in place: leaves first, then joins (a re-track is leave + join). */
export function applyDiff(state: PresenceMap, joins: PresenceMap, leaves: PresenceMap): PresenceMap {
  for (const [user, metas] of Object.entries(leaves)) {
    const cur = state[user];
    if (!cur) continue;
    const rest = cur.filter((m) => !metas.some((l) => sameMeta(m, l)));
    if (rest.length) state[user] = rest;
    else delete state[user];
  }
  for (const [user, metas] of Object.entries(joins)) {
    const cur = (state[user] ??= []);
    for (const m of metas) {
      const i = cur.findIndex((c) => sameMeta(c, m));
      if (i >= 0) cur[i] = m;
      else cur.push(m);
    }
  }
  return state;
}

/* ----------------------------------------------------------------------------------------- */

/**
 * Connects to an rtgate gateway. `url` is the gateway's `ws(s)://host/api/v1/ws`; the token is
 * sent as `?token=`. With `getToken`, a token is fetched initially and again before each
 * reconnect that follows a close with 1008 (expired or invalid token).
 */
export function connect(url: string, auth: Auth, options: ConnectOptions = {}): Client {
  return new Client(url, auth, options);
}
