import { afterEach, beforeEach, describe, expect, it, vi } from "vitest";
import { backoffDelay, compareIds, connect, RecentIds, type Client, type ConnectOptions } from "../../src/index.js";
import { FakeWebSocket, msg } from "./fake-ws.js";

const URL_ = "ws://gw.test/api/v1/ws";
const ROOM = "public:lobby";

async function settle(ms = 0): Promise<void> {
  await vi.advanceTimersByTimeAsync(ms);
}

function opts(extra: ConnectOptions = {}): ConnectOptions {
  return { WebSocket: FakeWebSocket as any, random: () => 0.5, connectTimeoutMs: 0, ...extra };
}

/** Connects with a fixed token and accepts the first socket. */
async function connected(extra: ConnectOptions = {}): Promise<{ client: Client; ws: FakeWebSocket }> {
  const client = connect(URL_, { token: "t0" }, opts(extra));
  await settle();
  const ws = FakeWebSocket.last();
  ws.accept();
  await settle();
  return { client, ws };
}

/** Joins ROOM on an accepted socket and acks the join. */
async function joined(client: Client, ws: FakeWebSocket, since?: string) {
  const room = client.room(ROOM);
  const p = room.join(since ? { since } : {});
  const join = ws.lastSent();
  expect(join).toMatchObject({ type: "join", room: ROOM });
  ws.push({ type: "presence_state", room: ROOM, data: {} });
  ws.ack(join);
  await p;
  return room;
}

/** Server drops the socket; waits the backoff and accepts the next one. */
async function reconnect(ws: FakeWebSocket, code = 1006): Promise<FakeWebSocket> {
  const before = FakeWebSocket.instances.length;
  ws.serverClose(code);
  await settle(20_000);
  expect(FakeWebSocket.instances.length).toBe(before + 1);
  const next = FakeWebSocket.last();
  next.accept();
  await settle();
  return next;
}

beforeEach(() => {
  vi.useFakeTimers();
  FakeWebSocket.reset();
});
afterEach(() => {
  vi.useRealTimers();
});

describe("connection", () => {
  it("puts the token in ?token= and reports states", async () => {
    const states: string[] = [];
    const client = connect(URL_, { token: "a b" }, opts());
    client.on("state", (s) => states.push(s));
    await settle();
    const ws = FakeWebSocket.last();
    expect(ws.url).toBe(`${URL_}?token=a%20b`);
    ws.accept();
    await settle();
    expect(client.state).toBe("open");
    await reconnect(ws, 1001);
    client.close();
    expect(states).toEqual(["connecting", "open", "reconnecting", "open", "closed"]);
    expect(FakeWebSocket.last().closedWith?.code).toBe(1000);
    // no reconnect after close()
    await settle(60_000);
    expect(FakeWebSocket.instances.length).toBe(2);
  });

  it("uses the global WebSocket when no option is given, and fails clearly without one", () => {
    const g = globalThis as any;
    const saved = g.WebSocket;
    try {
      delete g.WebSocket;
      expect(() => connect(URL_, { token: "t" })).toThrowError(/WebSocket/);
      g.WebSocket = FakeWebSocket;
      const c = connect(URL_, { token: "t" });
      c.close();
    } finally {
      g.WebSocket = saved;
    }
  });
});

describe("requests", () => {
  it("matches acks to sends by ref, whatever their order", async () => {
    const { client, ws } = await connected();
    const room = await joined(client, ws);
    const p1 = room.send({ text: "one" });
    const p2 = room.send({ text: "two" });
    const [f1, f2] = ws.sentOf("message");
    expect(f1).toMatchObject({ room: ROOM, data: { text: "one" } });
    expect(f1.ref).not.toBe(f2.ref);
    ws.ack(f2, { id: "5-1" });
    ws.ack(f1, { id: "5-0" });
    await expect(p1).resolves.toEqual({ id: "5-0" });
    await expect(p2).resolves.toEqual({ id: "5-1" });
  });

  it("rejects with the server's error code", async () => {
    const { client, ws } = await connected();
    const room = await joined(client, ws);
    const p = room.send({ text: "x" });
    ws.fail(ws.lastSent(), "rate_limited", "slow down");
    await expect(p).rejects.toMatchObject({ code: "rate_limited", message: "slow down" });
  });

  it("rejects with code timeout when no ack arrives in ackTimeoutMs", async () => {
    const { client, ws } = await connected({ ackTimeoutMs: 100 });
    const room = await joined(client, ws);
    const p = room.send({ text: "x" });
    const caught = p.catch((e) => e);
    await settle(99);
    let done = false;
    void p.then(() => (done = true), () => (done = true));
    await settle(0);
    expect(done).toBe(false);
    await settle(1);
    const err = await caught;
    expect(err).toBeInstanceOf(Error);
    expect(err.code).toBe("timeout");
    // a late ack is ignored
    ws.ack(ws.lastSent(), { id: "1-0" });
  });

  it("direct() sends data.to and resolves on ack", async () => {
    const { client, ws } = await connected();
    const got: any[] = [];
    client.on("direct", (m) => got.push(m));
    const p = client.direct("bob", { text: "hi" });
    const f = ws.lastSent();
    expect(f).toMatchObject({ type: "direct", data: { to: "bob", text: "hi" } });
    ws.ack(f);
    await expect(p).resolves.toBeUndefined();
    ws.push({ type: "direct", room: null, data: { to: "u1", text: "yo" }, sender_id: "bob" });
    expect(got[0].data.text).toBe("yo");
  });

  it("rejects in-flight requests without a key (direct) with code disconnected when the socket drops", async () => {
    const { client, ws } = await connected();
    await joined(client, ws);
    const p = client.direct("bob", { text: "x" });
    ws.serverClose(1006);
    await expect(p).rejects.toMatchObject({ code: "disconnected" });
    client.close();
  });
});

describe("connection failures", () => {
  it("an error without a close event (Node 20 on a refused connection) still reconnects", async () => {
    const client = connect(URL_, { token: "t" }, opts());
    await settle();
    const first = FakeWebSocket.last();
    first.onerror?.({});
    await settle(20_000);
    expect(FakeWebSocket.instances.length).toBe(2);
    expect(first.closedWith).not.toBeNull();
    FakeWebSocket.last().accept();
    await settle();
    expect(client.state).toBe("open");
    client.close();
  });

  it("an attempt with no welcome within connectTimeoutMs is abandoned and retried", async () => {
    const client = connect(URL_, { token: "t" }, opts({ connectTimeoutMs: 1000 }));
    await settle();
    const first = FakeWebSocket.last();
    await settle(999);
    expect(FakeWebSocket.instances.length).toBe(1);
    await settle(1 + 200); // the timeout, then the backoff (0.5 * 250 ms)
    expect(FakeWebSocket.instances.length).toBe(2);
    expect(first.closedWith).not.toBeNull();
    FakeWebSocket.last().accept();
    await settle();
    expect(client.state).toBe("open");
    // Welcomed: the timeout no longer applies.
    await settle(5000);
    expect(client.state).toBe("open");
    client.close();
  });
});

describe("idempotent sends", () => {
  it("puts a fresh valid idempotency_key on every send, or the caller's", async () => {
    const { client, ws } = await connected();
    const room = await joined(client, ws);
    room.send({ n: 1 }).catch(() => {});
    room.send({ n: 2 }).catch(() => {});
    room.send({ n: 3 }, { idempotencyKey: "order-17:retry.1" }).catch(() => {});
    const keys = ws.sentOf("message").map((f) => f.idempotency_key);
    expect(keys).toHaveLength(3);
    for (const k of keys.slice(0, 2)) expect(k).toMatch(/^[A-Za-z0-9_.:-]{1,64}$/);
    expect(new Set(keys).size).toBe(3);
    expect(keys[2]).toBe("order-17:retry.1");
    await expect(room.send({}, { idempotencyKey: "no spaces" })).rejects.toMatchObject({ code: "bad_request" });
    await expect(room.send({}, { idempotencyKey: "x".repeat(65) })).rejects.toMatchObject({ code: "bad_request" });
    client.close();
  });

  it("two clients never share a key", async () => {
    const a = await connected();
    const ra = await joined(a.client, a.ws);
    const b = await connected();
    const rb = await joined(b.client, b.ws);
    ra.send({}).catch(() => {});
    rb.send({}).catch(() => {});
    expect(a.ws.sentOf("message")[0].idempotency_key).not.toBe(b.ws.sentOf("message")[0].idempotency_key);
    a.client.close();
    b.client.close();
  });

  it("resends sends in flight at a disconnect with the same keys, first and in order, after the rejoin", async () => {
    const { client, ws } = await connected();
    const room = await joined(client, ws);
    const inFlight = [room.send({ n: 1 }), room.send({ n: 2 })];
    const firstKeys = ws.sentOf("message").map((f) => f.idempotency_key);
    ws.ack(ws.sentOf("message")[0], { id: "5-0" }); // n=1 acked before the drop
    await expect(inFlight[0]).resolves.toEqual({ id: "5-0" });
    ws.serverClose(1006);
    const later = room.send({ n: 3 }); // buffered while disconnected
    await settle(20_000);
    const ws2 = FakeWebSocket.last();
    ws2.accept();
    await settle();
    expect(ws2.sent.map((f) => f.type)).toEqual(["join"]);
    ws2.ack(ws2.sent[0]);
    await settle();
    const resent = ws2.sentOf("message");
    expect(resent.map((f) => f.data.n)).toEqual([2, 3]);
    expect(resent[0].idempotency_key).toBe(firstKeys[1]);
    // The server had stored n=2 before the drop: the repeat is acked with that id.
    ws2.ack(resent[0], { id: "6-0" });
    ws2.ack(resent[1], { id: "7-0" });
    await expect(inFlight[1]).resolves.toEqual({ id: "6-0" });
    await expect(later).resolves.toEqual({ id: "7-0" });
    client.close();
  });

  it("a resent send still times out if the new connection never answers", async () => {
    const { client, ws } = await connected({ ackTimeoutMs: 1000 });
    const room = await joined(client, ws);
    const p = room.send({ n: 1 });
    const caught = p.catch((e) => e);
    ws.serverClose(1006);
    await settle(20_000);
    const ws2 = FakeWebSocket.last();
    ws2.accept();
    await settle();
    ws2.ack(ws2.sent[0]);
    await settle();
    expect(ws2.sentOf("message")).toHaveLength(1);
    await settle(1500);
    expect(await caught).toMatchObject({ code: "timeout" });
    client.close();
  });
});

describe("overflow recovery", () => {
  it("rejoins from the notice's since and delivers the dropped messages once", async () => {
    const { client, ws } = await connected();
    const room = client.room(ROOM);
    const seen: string[] = [];
    room.on("message", (m) => seen.push(m.id!));
    const notices: any[] = [];
    room.on("system", (m) => notices.push(m.data));
    await joined(client, ws);
    // Given 1..3, then 4..7 dropped (drop_oldest), then 8..9 given, then the notice.
    for (const id of ["1-0", "2-0", "3-0", "8-0", "9-0"]) ws.push(msg(ROOM, id));
    ws.push({ type: "system", room: ROOM, data: { event: "overflow", since: "3-0" } });
    expect(notices).toEqual([{ event: "overflow", since: "3-0" }]);
    const sent = ws.sent.slice(-2);
    expect(sent[0]).toMatchObject({ type: "leave", room: ROOM });
    expect(sent[1]).toMatchObject({ type: "join", room: ROOM, since: "3-0" });
    ws.ack(sent[0]);
    // Live frames queued before the leave took effect.
    ws.push(msg(ROOM, "10-0"));
    // The replay: everything after 3-0, in order, including what was already delivered.
    for (const id of ["4-0", "5-0", "6-0", "7-0", "8-0", "9-0", "10-0", "11-0"]) ws.push(msg(ROOM, id));
    ws.push({ type: "presence_state", room: ROOM, data: {} });
    ws.ack(sent[1]);
    await settle();
    ws.push(msg(ROOM, "11-0")); // a duplicate after the recovery
    ws.push(msg(ROOM, "12-0"));
    expect(seen).toEqual(["1-0", "2-0", "3-0", "8-0", "9-0", "10-0", "4-0", "5-0", "6-0", "7-0", "11-0", "12-0"]);
    expect(new Set(seen).size).toBe(seen.length);
    expect(room.lastMessageId).toBe("12-0");
    // A later reconnect resumes from the newest id, not from the notice.
    const ws2 = await reconnect(ws);
    expect(ws2.sentOf("join")[0]).toMatchObject({ since: "12-0" });
    client.close();
  });

  it("a connection lost during the recovery rejoins from the notice's since", async () => {
    const { client, ws } = await connected();
    const room = client.room(ROOM);
    const seen: string[] = [];
    room.on("message", (m) => seen.push(m.id!));
    await joined(client, ws);
    for (const id of ["1-0", "5-0"]) ws.push(msg(ROOM, id));
    ws.push({ type: "system", room: ROOM, data: { event: "overflow", since: "1-0" } });
    const ws2 = await reconnect(ws);
    const join = ws2.sentOf("join")[0];
    expect(join).toMatchObject({ since: "1-0" });
    for (const id of ["2-0", "3-0", "4-0", "5-0", "6-0"]) ws2.push(msg(ROOM, id));
    ws2.ack(join);
    await settle();
    expect(seen).toEqual(["1-0", "5-0", "2-0", "3-0", "4-0", "6-0"]);
    client.close();
  });

  it("a notice while a join is in flight recovers again once it settles", async () => {
    const { client, ws } = await connected();
    const room = client.room(ROOM);
    await joined(client, ws);
    ws.push(msg(ROOM, "3-0"));
    ws.push({ type: "system", room: ROOM, data: { event: "overflow", since: "3-0" } });
    const firstJoin = ws.lastSent();
    ws.push(msg(ROOM, "9-0"));
    ws.push({ type: "system", room: ROOM, data: { event: "overflow", since: "2-0" } });
    expect(ws.sentOf("join")).toHaveLength(2); // the initial join and the first recovery
    ws.ack(firstJoin);
    await settle();
    const joins = ws.sentOf("join");
    expect(joins).toHaveLength(3);
    expect(joins[2]).toMatchObject({ since: "2-0" });
    ws.ack(joins[2]);
    await settle();
    expect(room.lastMessageId).toBe("9-0");
    client.close();
  });

  it("remembers a bounded number of ids", () => {
    const r = new RecentIds(3);
    for (const id of ["1-0", "2-0", "3-0", "4-0"]) r.add(id);
    expect(r.size).toBe(3);
    expect(r.has("1-0")).toBe(false);
    expect(r.has("4-0")).toBe(true);
  });
});

describe("buffer while disconnected", () => {
  it("buffers sends and flushes them in order after the rejoin", async () => {
    const { client, ws } = await connected();
    const room = await joined(client, ws);
    ws.push(msg(ROOM, "100-0"));
    ws.serverClose(1006);
    const sends = [1, 2, 3].map((n) => room.send({ n }));
    await settle(20_000);
    const ws2 = FakeWebSocket.last();
    expect(ws2).not.toBe(ws);
    ws2.accept();
    await settle();
    // only the rejoin so far: buffered sends wait for it
    expect(ws2.sent.map((f) => f.type)).toEqual(["join"]);
    expect(ws2.sent[0]).toMatchObject({ room: ROOM, since: "100-0" });
    expect(client.state).toBe("reconnecting");
    ws2.ack(ws2.sent[0]);
    await settle();
    expect(client.state).toBe("open");
    const flushed = ws2.sentOf("message");
    expect(flushed.map((f) => f.data.n)).toEqual([1, 2, 3]);
    flushed.forEach((f, i) => ws2.ack(f, { id: `200-${i}` }));
    expect(await Promise.all(sends)).toEqual([{ id: "200-0" }, { id: "200-1" }, { id: "200-2" }]);
  });

  it("buffers sends made before the first connection", async () => {
    const client = connect(URL_, { token: "t" }, opts());
    const room = client.room(ROOM);
    const j = room.join();
    const s = room.send({ text: "early" });
    await settle();
    const ws = FakeWebSocket.last();
    ws.accept();
    await settle();
    expect(ws.sent.map((f) => f.type)).toEqual(["join"]);
    ws.ack(ws.sent[0]);
    await j;
    await settle();
    expect(ws.sent.map((f) => f.type)).toEqual(["join", "message"]);
    ws.ack(ws.sent[1], { id: "1-0" });
    await expect(s).resolves.toEqual({ id: "1-0" });
  });

  it("is bounded: beyond bufferLimit send rejects with buffer_full", async () => {
    const { client, ws } = await connected({ bufferLimit: 2 });
    const room = await joined(client, ws);
    ws.serverClose(1006);
    const a = room.send({ n: 1 });
    const b = room.send({ n: 2 });
    await expect(room.send({ n: 3 })).rejects.toMatchObject({ code: "buffer_full" });
    client.close();
    await expect(a).rejects.toMatchObject({ code: "closed" });
    await expect(b).rejects.toMatchObject({ code: "closed" });
  });
});

describe("rejoin", () => {
  it("rejoins with since = last delivered id and drops duplicates (numeric id order)", async () => {
    const { client, ws } = await connected();
    const room = client.room(ROOM);
    const seen: string[] = [];
    room.on("message", (m) => seen.push(m.id!));
    await joined(client, ws);
    ws.push(msg(ROOM, "9-0"));
    ws.push(msg(ROOM, "10-0")); // numerically after 9-0 (as strings it sorts before)
    ws.push(msg(ROOM, "10-0")); // duplicate
    ws.push(msg(ROOM, "9-5")); // older
    const ws2 = await reconnect(ws);
    const join = ws2.sentOf("join")[0];
    expect(join).toMatchObject({ room: ROOM, since: "10-0" });
    // replay overlapping what was delivered, then new ones
    ws2.push(msg(ROOM, "10-0"));
    ws2.push(msg(ROOM, "10-2"));
    ws2.push(msg(ROOM, "10-10"));
    ws2.push({ type: "presence_state", room: ROOM, data: {} });
    ws2.ack(join);
    ws2.push(msg(ROOM, "10-9"));
    ws2.push(msg(ROOM, "11-0"));
    expect(seen).toEqual(["9-0", "10-0", "10-2", "10-10", "11-0"]);
    expect(room.lastMessageId).toBe("11-0");
  });

  it("compares ids by their two numeric parts", () => {
    expect(compareIds("2-10", "2-9")).toBeGreaterThan(0);
    expect(compareIds("10-0", "9-99")).toBeGreaterThan(0);
    expect(compareIds("1732183810123-0", "1732183810123-0")).toBe(0);
    expect(compareIds("18446744073709551615-1", "18446744073709551615-0")).toBeGreaterThan(0);
  });

  it("starts from the since given to join() and keeps self:false on rejoin", async () => {
    const { client, ws } = await connected();
    const room = client.room(ROOM);
    const seen: string[] = [];
    room.on("message", (m) => seen.push(m.id!));
    const p = room.join({ since: "5-0", self: false });
    const j = ws.lastSent();
    expect(j).toMatchObject({ since: "5-0", self: false });
    ws.push(msg(ROOM, "5-0"));
    ws.push(msg(ROOM, "6-0"));
    ws.ack(j);
    await p;
    const ws2 = await reconnect(ws);
    expect(ws2.sentOf("join")[0]).toMatchObject({ since: "6-0", self: false });
    expect(seen).toEqual(["6-0"]);
  });

  it("history_gap: emits gap and resolves join", async () => {
    const { client, ws } = await connected();
    const room = client.room(ROOM);
    const gaps: any[] = [];
    room.on("gap", (g) => gaps.push(g));
    const p = room.join({ since: "1-0" });
    ws.fail(ws.lastSent(), "history_gap", "gone");
    await expect(p).resolves.toBeUndefined();
    expect(gaps).toEqual([{ room: ROOM, since: "1-0", message: "gone" }]);
  });

  it("a refused join rejects with the code", async () => {
    const { client, ws } = await connected();
    const p = client.room("private:other").join();
    ws.fail(ws.lastSent(), "forbidden");
    await expect(p).rejects.toMatchObject({ code: "forbidden" });
    expect(client.room("private:other").joined).toBe(false);
  });

  it("re-tracks presence meta after the rejoin, and not after leave", async () => {
    const { client, ws } = await connected();
    const room = await joined(client, ws);
    const t = room.track({ status: "online" });
    ws.ack(ws.lastSent());
    await t;
    const ws2 = await reconnect(ws);
    expect(ws2.sent.map((f) => f.type)).toEqual(["join"]);
    ws2.ack(ws2.sent[0]);
    await settle();
    expect(ws2.sent.map((f) => f.type)).toEqual(["join", "track"]);
    expect(ws2.sent[1]).toMatchObject({ room: ROOM, data: { status: "online" } });
    ws2.ack(ws2.sent[1]);
    const l = room.leave();
    expect(ws2.lastSent()).toMatchObject({ type: "leave", room: ROOM });
    ws2.ack(ws2.lastSent());
    await l;
    const ws3 = await reconnect(ws2);
    expect(ws3.sent).toEqual([]);
    expect(client.state).toBe("open");
  });
});

describe("rejoin failures", () => {
  it("a rejoin with no reply in ackTimeoutMs starts a new connection", async () => {
    const { client, ws } = await connected({ ackTimeoutMs: 500 });
    await joined(client, ws);
    ws.serverClose(1006);
    await settle(20_000);
    const ws2 = FakeWebSocket.last();
    ws2.accept();
    await settle();
    expect(ws2.sentOf("join")).toHaveLength(1);
    await settle(500); // join unanswered
    expect(ws2.closedWith?.code).toBe(4000);
    await settle(20_000);
    const ws3 = FakeWebSocket.last();
    expect(ws3).not.toBe(ws2);
    ws3.accept();
    await settle();
    ws3.ack(ws3.sentOf("join")[0]);
    await settle();
    expect(client.state).toBe("open");
  });

  it("a rejoin answered unavailable is retried on the same connection", async () => {
    const { client, ws } = await connected();
    await joined(client, ws);
    const ws2 = await reconnect(ws);
    ws2.fail(ws2.sentOf("join")[0], "unavailable");
    await settle(1000);
    const joins = ws2.sentOf("join");
    expect(joins).toHaveLength(2);
    ws2.ack(joins[1]);
    await settle();
    expect(client.state).toBe("open");
  });

  it("a track made while disconnected settles with the track sent after the rejoin", async () => {
    const { client, ws } = await connected();
    const room = await joined(client, ws);
    ws.serverClose(1006);
    let settled = false;
    const t = room.track({ s: 1 }).then(() => (settled = true));
    await settle(20_000);
    const ws2 = FakeWebSocket.last();
    ws2.accept();
    await settle();
    ws2.ack(ws2.sentOf("join")[0]);
    await settle();
    expect(settled).toBe(false);
    ws2.ack(ws2.sentOf("track")[0]);
    await t;
    expect(settled).toBe(true);
  });
});

describe("tokens", () => {
  it("calls getToken initially and again before a reconnect after 1008 only", async () => {
    const tokens = ["expired", "fresh", "unused"];
    const getToken = vi.fn(async () => tokens.shift()!);
    const client = connect(URL_, { getToken }, opts());
    await settle();
    expect(getToken).toHaveBeenCalledTimes(1);
    const ws1 = FakeWebSocket.last();
    expect(ws1.token).toBe("expired");
    ws1.serverClose(1008, "token expired");
    await settle(20_000);
    expect(getToken).toHaveBeenCalledTimes(2);
    const ws2 = FakeWebSocket.last();
    expect(ws2.token).toBe("fresh");
    ws2.accept();
    await settle();
    expect(client.state).toBe("open");
    // other close codes reuse the token
    const ws3 = await reconnect(ws2, 1001);
    expect(getToken).toHaveBeenCalledTimes(2);
    expect(ws3.token).toBe("fresh");
    client.close();
  });

  it("a failing getToken is retried with backoff", async () => {
    let calls = 0;
    const getToken = async () => {
      if (++calls === 1) throw new Error("auth server down");
      return "good";
    };
    const client = connect(URL_, { getToken }, opts());
    const errors: any[] = [];
    client.on("error", (e) => errors.push(e));
    await settle();
    expect(FakeWebSocket.instances.length).toBe(0);
    await settle(20_000);
    expect(FakeWebSocket.last().token).toBe("good");
    expect(errors[0].code).toBe("token");
    client.close();
  });

  it("a fixed token refused with 1008 before welcome stops the client", async () => {
    const client = connect(URL_, { token: "bad" }, opts());
    const errors: any[] = [];
    client.on("error", (e) => errors.push(e));
    await settle();
    FakeWebSocket.last().serverClose(1008, "invalid token");
    await settle(60_000);
    expect(client.state).toBe("closed");
    expect(FakeWebSocket.instances.length).toBe(1);
    expect(errors.some((e) => e.code === "unauthorized")).toBe(true);
  });
});

describe("backoff", () => {
  it("stays within [0, min(max, min * 2^attempt))", () => {
    for (let attempt = 0; attempt < 12; attempt++) {
      const cap = Math.min(10_000, 250 * 2 ** attempt);
      expect(backoffDelay(attempt, 250, 10_000, () => 0)).toBe(0);
      expect(backoffDelay(attempt, 250, 10_000, () => 0.999999)).toBeLessThan(cap);
      expect(backoffDelay(attempt, 250, 10_000, () => 0.999999)).toBeGreaterThanOrEqual(cap - 1);
      for (let i = 0; i < 50; i++) {
        const d = backoffDelay(attempt, 250, 10_000);
        expect(d).toBeGreaterThanOrEqual(0);
        expect(d).toBeLessThan(cap);
      }
    }
    expect(backoffDelay(100, 250, 10_000, () => 0.999999)).toBeLessThan(10_000);
  });

  it("waits the jittered delay, grows per failed attempt and resets after welcome", async () => {
    const client = connect(URL_, { token: "t" }, opts({ random: () => 0.999999, minDelayMs: 100, maxDelayMs: 350 }));
    await settle();
    const delays: number[] = [];
    for (let i = 0; i < 4; i++) {
      const n = FakeWebSocket.instances.length;
      FakeWebSocket.last().serverClose(1006);
      let waited = 0;
      while (FakeWebSocket.instances.length === n) {
        await settle(1);
        waited++;
        if (waited > 1000) throw new Error("no reconnect");
      }
      delays.push(waited);
    }
    // ceilings 100, 200, 350 (capped), 350; delay = floor(0.999999 * ceiling) = ceiling - 1 ms
    expect(delays).toEqual([99, 199, 349, 349]);
    FakeWebSocket.last().accept();
    await settle();
    const n = FakeWebSocket.instances.length;
    FakeWebSocket.last().serverClose(1011);
    await settle(100);
    expect(FakeWebSocket.instances.length).toBe(n + 1);
    client.close();
  });
});

describe("presence", () => {
  it("maintains user -> metas from presence_state and presence_diff", async () => {
    const { client, ws } = await connected();
    const room = client.room(ROOM);
    const events: any[] = [];
    room.on("presence", (e) => events.push(e));
    const p = room.join();
    const j = ws.lastSent();
    ws.push({
      type: "presence_state",
      room: ROOM,
      data: { alice: [{ s: "away", session_id: "a:1" }], bob: [{ session_id: "b:1" }] },
    });
    ws.ack(j);
    await p;
    expect(room.presenceState()).toEqual({ alice: [{ s: "away", session_id: "a:1" }], bob: [{ session_id: "b:1" }] });
    // alice re-tracks (leave old + join new), carol joins, bob leaves
    ws.push({
      type: "presence_diff",
      room: ROOM,
      data: {
        joins: { alice: [{ s: "here", session_id: "a:1" }], carol: [{ session_id: "c:1" }, { session_id: "c:2" }] },
        leaves: { alice: [{ s: "away", session_id: "a:1" }], bob: [{ session_id: "b:1" }] },
      },
    });
    expect(room.presenceState()).toEqual({
      alice: [{ s: "here", session_id: "a:1" }],
      carol: [{ session_id: "c:1" }, { session_id: "c:2" }],
    });
    ws.push({ type: "presence_diff", room: ROOM, data: { joins: {}, leaves: { carol: [{ session_id: "c:1" }] } } });
    expect(room.presenceState()).toEqual({ alice: [{ s: "here", session_id: "a:1" }], carol: [{ session_id: "c:2" }] });
    expect(events.map((e) => e.kind)).toEqual(["state", "diff", "diff"]);
    expect(events[1].joins.carol).toHaveLength(2);
    // a rejoin's presence_state replaces the map
    const ws2 = await reconnect(ws);
    ws2.push({ type: "presence_state", room: ROOM, data: { dave: [{ session_id: "d:1" }] } });
    expect(room.presenceState()).toEqual({ dave: [{ session_id: "d:1" }] });
  });
});

describe("system messages", () => {
  it("delivers room system messages on 'system' with the same duplicate check", async () => {
    const { client, ws } = await connected();
    const room = await joined(client, ws);
    const sys: any[] = [];
    room.on("system", (m) => sys.push(m));
    ws.push({ type: "system", room: ROOM, id: "3-0", data: { event: "x" } });
    ws.push({ type: "system", room: ROOM, id: "3-0", data: { event: "x" } });
    expect(sys).toHaveLength(1);
  });
});
