/**
 * The SDK against a real rtgate (the binary at /work/main/target/debug/rtgate, or $RTGATE_BIN):
 * memory broker, and Redis when `redis-server` is on PATH.
 */
import { spawn, spawnSync, type ChildProcess } from "node:child_process";
import { createHmac } from "node:crypto";
import { chmodSync, copyFileSync, existsSync, mkdtempSync, readFileSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { createServer } from "node:net";
import { dirname, resolve } from "node:path";
import { fileURLToPath } from "node:url";
import { afterAll, describe, expect, it } from "vitest";
import WS from "ws";
import { connect, type Client, type ConnectOptions, type Envelope } from "../src/index.js";

const here = dirname(fileURLToPath(import.meta.url));
const SOURCE_BIN = process.env.RTGATE_BIN ?? resolve(here, "../../../target/debug/rtgate");
if (!existsSync(SOURCE_BIN)) throw new Error(`${SOURCE_BIN} missing: run \`cargo build\` in the repository root first`);

/**
 * A private copy of the binary, so that a `cargo build` running meanwhile (which rewrites
 * target/debug/rtgate) cannot break a server start mid-test. Retried while the file is being written.
 */
function privateBinary(): { bin: string; dir: string } {
  const dir = mkdtempSync(resolve(tmpdir(), "rtgate-sdk-test-"));
  const bin = resolve(dir, "rtgate");
  const deadline = Date.now() + 120_000;
  for (;;) {
    try {
      copyFileSync(SOURCE_BIN, bin);
      chmodSync(bin, 0o755);
      if (spawnSync(bin, ["--version"], { timeout: 10_000 }).status === 0) return { bin, dir };
    } catch {
      /* being rewritten: retry */
    }
    if (Date.now() > deadline) throw new Error(`cannot get a working copy of ${SOURCE_BIN}`);
    spawnSync("sleep", ["1"]);
  }
}
const { bin: BIN, dir: BIN_DIR } = privateBinary();
// At least 32 bytes: rtgate refuses shorter HS256 secrets (exit 2).
const SECRET = "integration-secret-0123456789abcdef";
const WebSocketImpl: any = (globalThis as any).WebSocket ?? WS;
const HAVE_REDIS = spawnSync("sh", ["-c", "command -v redis-server"]).status === 0;

const children = new Set<ChildProcess>();

function killAll(): void {
  for (const c of children) {
    try {
      c.kill("SIGCONT");
      c.kill("SIGKILL");
    } catch {
      /* gone */
    }
  }
  children.clear();
  rmSync(BIN_DIR, { recursive: true, force: true });
}
process.on("exit", killAll);
afterAll(killAll);

/* ---------------------------------- helpers ---------------------------------- */

function b64url(x: string | Buffer): string {
  return Buffer.from(x).toString("base64url");
}

/** An HS256 JWT for `sub` expiring `ttlSec` from now (negative: already expired). */
function mint(sub: string, ttlSec = 3600): string {
  const header = b64url(JSON.stringify({ alg: "HS256", typ: "JWT" }));
  const claims = b64url(JSON.stringify({ sub, exp: Math.floor(Date.now() / 1000) + ttlSec }));
  const sig = createHmac("sha256", SECRET).update(`${header}.${claims}`).digest("base64url");
  return `${header}.${claims}.${sig}`;
}

async function waitFor(what: string, cond: () => boolean, timeoutMs = 15_000): Promise<void> {
  const deadline = Date.now() + timeoutMs;
  while (!cond()) {
    if (Date.now() > deadline) throw new Error(`timed out waiting for ${what}`);
    await new Promise((r) => setTimeout(r, 20));
  }
}

function withTimeout<T>(p: Promise<T>, ms: number, what: string): Promise<T> {
  let t: ReturnType<typeof setTimeout>;
  return Promise.race([
    p,
    new Promise<T>((_, rej) => {
      t = setTimeout(() => rej(new Error(`timed out: ${what}`)), ms);
    }),
  ]).finally(() => clearTimeout(t!));
}

function freePort(): Promise<number> {
  return new Promise((res, rej) => {
    const s = createServer();
    s.once("error", rej);
    s.listen(0, "127.0.0.1", () => {
      const port = (s.address() as any).port as number;
      s.close(() => res(port));
    });
  });
}

function cleanEnv(extra: Record<string, string>): NodeJS.ProcessEnv {
  const env: NodeJS.ProcessEnv = {};
  for (const [k, v] of Object.entries(process.env)) if (!k.startsWith("RTGATE_")) env[k] = v;
  return { ...env, ...extra };
}

interface Server {
  proc: ChildProcess;
  port: number;
  url: string;
  stop(): Promise<void>;
}

/** Starts `rtgate serve`; resolves once it printed its listening address. */
async function startServer(listen = "127.0.0.1:0", extraEnv: Record<string, string> = {}): Promise<Server> {
  const deadline = Date.now() + 20_000;
  for (;;) {
    const env = cleanEnv({
      RTGATE_SERVER__LISTEN: listen,
      RTGATE_AUTH__JWT_SECRET: SECRET,
      RTGATE_WS__RATE_LIMIT_PER_SEC: "1000",
      RTGATE_WS__RATE_LIMIT_BURST: "1000",
      // Every test connects from 127.0.0.1, many times a second: no per-address upgrade limit.
      RTGATE_SERVER__CONNECT_RATE_PER_IP: "0",
      ...extraEnv,
    });
    const proc = spawn(BIN, ["serve"], { env, stdio: ["ignore", "pipe", "pipe"] });
    children.add(proc);
    let stderr = "";
    proc.stderr!.on("data", (d) => {
      stderr += d;
      if (stderr.length > 20_000) stderr = stderr.slice(-10_000);
    });
    try {
      const port = await new Promise<number>((res, rej) => {
        let out = "";
        const timer = setTimeout(() => rej(new Error(`rtgate did not start: ${stderr}`)), 20_000);
        proc.stdout!.on("data", (d) => {
          out += d;
          const m = /listening on http:\/\/[\d.]+:(\d+)/.exec(out);
          if (m) {
            clearTimeout(timer);
            res(Number(m[1]));
          }
        });
        proc.once("exit", (code) => {
          clearTimeout(timer);
          rej(new Error(`rtgate exited with ${code}: ${stderr}`));
        });
      });
      return {
        proc,
        port,
        url: `ws://127.0.0.1:${port}/api/v1/ws`,
        stop: () => stopProc(proc),
      };
    } catch (e) {
      // The same port may still be held for a moment after a kill: retry until the deadline.
      children.delete(proc);
      if (Date.now() > deadline || !/address|in use/i.test(String(e))) throw e;
      await new Promise((r) => setTimeout(r, 200));
    }
  }
}

function stopProc(proc: ChildProcess): Promise<void> {
  return new Promise((res) => {
    if (proc.exitCode !== null || proc.signalCode !== null) {
      children.delete(proc);
      return res();
    }
    const t = setTimeout(res, 5000);
    proc.once("exit", () => {
      clearTimeout(t);
      children.delete(proc);
      res();
    });
    proc.kill("SIGCONT");
    proc.kill("SIGKILL");
  });
}

async function startRedis(): Promise<{ url: string; proc: ChildProcess }> {
  const port = await freePort();
  const proc = spawn("redis-server", ["--port", String(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"], {
    stdio: ["ignore", "pipe", "pipe"],
  });
  children.add(proc);
  await new Promise<void>((res, rej) => {
    let out = "";
    const timer = setTimeout(() => rej(new Error(`redis-server did not start: ${out}`)), 15_000);
    proc.stdout!.on("data", (d) => {
      out += d;
      if (/ready to accept connections/i.test(out)) {
        clearTimeout(timer);
        res();
      }
    });
    proc.once("exit", (c) => rej(new Error(`redis-server exited ${c}: ${out}`)));
  });
  return { url: `redis://127.0.0.1:${port}`, proc };
}

const clients: Client[] = [];
function client(url: string, sub: string, options: ConnectOptions = {}): Client {
  const c = connect(url, { token: mint(sub) }, { WebSocket: WebSocketImpl, minDelayMs: 50, maxDelayMs: 500, ...options });
  clients.push(c);
  return c;
}
afterAll(() => {
  for (const c of clients) c.close();
});

async function opened(c: Client): Promise<void> {
  await waitFor("client open", () => c.state === "open");
}

/* ---------------------------------- cases ---------------------------------- */

describe("rtgate integration", () => {
  it("two clients chat through one room (messages, presence, direct)", async () => {
    const server = await startServer();
    try {
      const alice = client(server.url, "alice");
      const bob = client(server.url, "bob");
      const room = "public:chat";
      const aRoom = alice.room(room);
      const bRoom = bob.room(room);
      const aGot: Envelope[] = [];
      const bGot: Envelope[] = [];
      aRoom.on("message", (m) => aGot.push(m));
      bRoom.on("message", (m) => bGot.push(m));
      await withTimeout(aRoom.join(), 10_000, "alice join");
      await withTimeout(bRoom.join(), 10_000, "bob join");
      await aRoom.track({ status: "online" });
      await waitFor("bob sees alice's presence", () => (bRoom.presenceState().alice ?? []).length === 1);
      expect(bRoom.presenceState().alice![0]).toMatchObject({ status: "online" });

      const { id: id1 } = await aRoom.send({ text: "hi bob" });
      const { id: id2 } = await bRoom.send({ text: "hi alice" });
      await waitFor("both see both messages", () => aGot.length === 2 && bGot.length === 2);
      for (const got of [aGot, bGot]) {
        expect(got.map((m) => m.id)).toEqual([id1, id2]);
        expect(got.map((m) => m.sender_id)).toEqual(["alice", "bob"]);
        expect(got.map((m) => m.data.text)).toEqual(["hi bob", "hi alice"]);
      }

      const directs: Envelope[] = [];
      bob.on("direct", (m) => directs.push(m));
      await alice.direct("bob", { text: "psst" });
      await waitFor("bob gets the direct", () => directs.length === 1);
      expect(directs[0]).toMatchObject({ sender_id: "alice", data: { text: "psst" } });

      await aRoom.untrack();
      await waitFor("alice's presence gone", () => !bRoom.presenceState().alice);
      await bRoom.leave();
      alice.close();
      bob.close();
    } finally {
      await server.stop();
    }
  });

  /**
   * The subscriber keeps every acked message exactly once and in order across a restart of its
   * server: `kill` stops the subscriber's server (and the publisher's when `pubCutOff`), the
   * publisher keeps sending (buffered by the SDK when it is cut off too), then `start` brings the
   * server back on the same port.
   */
  async function conversationAcrossRestart(
    pubUrl: string,
    subUrl: string,
    kill: () => Promise<void>,
    start: () => Promise<void>,
    pubCutOff: boolean,
  ) {
    const room = `public:restart-${Math.random().toString(36).slice(2, 8)}`;
    const pub = client(pubUrl, "publisher");
    const sub = client(subUrl, "subscriber");
    const subStates: string[] = [];
    sub.on("state", (s) => subStates.push(s));
    const got: Envelope[] = [];
    const gaps: unknown[] = [];
    sub.room(room).on("message", (m) => got.push(m));
    sub.room(room).on("gap", (g) => gaps.push(g));
    await withTimeout(sub.room(room).join(), 10_000, "sub join");
    await withTimeout(pub.room(room).join({ self: false }), 10_000, "pub join");

    const acked: string[] = [];
    const failed: string[] = [];
    const sendBatch = async (from: number, n: number) => {
      const ps = [];
      for (let i = from; i < from + n; i++) {
        ps.push(
          pub.room(room).send({ n: i }).then(
            ({ id }) => acked.push(id),
            (e) => failed.push(`${i}:${e.code}`),
          ),
        );
      }
      await withTimeout(Promise.all(ps), 30_000, "batch acks");
    };

    await sendBatch(0, 20);
    await waitFor("sub has the first batch", () => got.length === 20);

    await kill();
    await waitFor("sub notices", () => sub.state === "reconnecting");
    if (pubCutOff) await waitFor("pub notices", () => pub.state === "reconnecting");
    // Keep talking while the subscriber's server is away.
    const during = sendBatch(20, 20);
    await new Promise((r) => setTimeout(r, 200));
    await start();
    await during;
    await waitFor("sub back", () => sub.state === "open", 20_000);
    await sendBatch(40, 20);

    await waitFor(
      "sub has every acked message",
      () => (pubCutOff ? got.some((m) => m.data.n === 59) : got.length >= acked.length),
      20_000,
    );
    await new Promise((r) => setTimeout(r, 300)); // any straggler duplicate would show up here

    console.log(
      `restart case: acked=${acked.length} failed=${JSON.stringify(failed)} delivered=${got.length} ` +
        `sub states=${subStates.join(",")}`,
    );
    expect(failed).toEqual([]);
    expect(acked.length).toBe(60);
    const ids = got.map((m) => m.id!);
    if (pubCutOff) {
      // The memory broker's history died with the process: the rejoin's `since` names history
      // the new process never had, which the server answers with `history_gap` (reported once).
      // Whatever the subscriber received is each message once, in order, and every message
      // sent once it was back is there.
      expect(gaps.length).toBe(1);
      expect(new Set(ids).size).toBe(ids.length);
      const ns = got.map((m) => m.data.n as number);
      expect([...ns].sort((a, b) => a - b)).toEqual(ns);
      for (const n of [...Array(20).keys(), ...Array.from({ length: 20 }, (_, i) => 40 + i)]) {
        expect(ns).toContain(n);
      }
      pub.close();
      sub.close();
      return;
    }
    expect(gaps).toEqual([]);
    expect(new Set(ids).size).toBe(ids.length); // no duplicate
    const sortedAcked = [...acked].sort((a, b) => {
      const [a1, a2] = a.split("-").map(BigInt);
      const [b1, b2] = b.split("-").map(BigInt);
      return a1! < b1! ? -1 : a1! > b1! ? 1 : a2! < b2! ? -1 : a2! > b2! ? 1 : 0;
    });
    expect(ids).toEqual(sortedAcked); // every acked message, in id order, exactly once
    expect(got.map((m) => m.data.n)).toEqual([...Array(60).keys()]); // and in send order
    pub.close();
    sub.close();
  }

  it("server restart mid-conversation (memory broker): one history_gap, then each message once", async () => {
    let server = await startServer();
    const port = server.port;
    try {
      await conversationAcrossRestart(
        server.url,
        server.url,
        () => server.stop(),
        async () => {
          server = await startServer(`127.0.0.1:${port}`);
        },
        true,
      );
    } finally {
      await server.stop();
    }
  });

  it.skipIf(!HAVE_REDIS)(
    "server restart mid-conversation (Redis broker, two instances): subscriber's instance restarts",
    async () => {
      const redis = await startRedis();
      const env = { RTGATE_BROKER__KIND: "redis", RTGATE_REDIS__URL: redis.url };
      const a = await startServer("127.0.0.1:0", env);
      let b = await startServer("127.0.0.1:0", env);
      const bPort = b.port;
      try {
        await conversationAcrossRestart(
          a.url,
          b.url,
          () => b.stop(),
          async () => {
            b = await startServer(`127.0.0.1:${bPort}`, env);
          },
          false,
        );
      } finally {
        await a.stop();
        await b.stop();
        await stopProc(redis.proc);
      }
    },
  );

  it("an expired token is refreshed through getToken after the 1008 close", async () => {
    const server = await startServer();
    try {
      const tokens = [mint("carol", -60), mint("carol", 3600)];
      let calls = 0;
      const closes: string[] = [];
      const c = connect(
        server.url,
        {
          getToken: async () => {
            calls++;
            return tokens.shift() ?? mint("carol", 3600);
          },
        },
        { WebSocket: WebSocketImpl, minDelayMs: 50, maxDelayMs: 500 },
      );
      clients.push(c);
      c.on("error", (e: any) => closes.push(`${e.code}: ${e.message}`));
      await opened(c);
      expect(calls).toBe(2);
      expect(closes.some((x) => x.includes("1008"))).toBe(true);
      expect(c.welcome?.user_id).toBe("carol");
      const r = c.room("public:tokens");
      await r.join();
      const { id } = await r.send({ text: "refreshed" });
      expect(id).toMatch(/^\d+-\d+$/);
      c.close();
    } finally {
      await server.stop();
    }
  });

  it("a slow reader that lost frames to drop_oldest recovers every message once from the overflow notice", async () => {
    const server = await startServer("127.0.0.1:0", {
      RTGATE_WS__SEND_QUEUE_MAX: "8",
      RTGATE_WS__OVERFLOW_POLICY: "drop_oldest",
      RTGATE_BROKER__HISTORY_SIZE: "2000",
      RTGATE_BROKER__REPLAY_LIMIT: "2000",
    });
    try {
      // The subscriber's sockets, so the test can stop reading from one (a slow client).
      const sockets: any[] = [];
      class TappedWS extends WS {
        constructor(url: string) {
          super(url);
          sockets.push(this);
        }
      }
      const room = "public:overflow-sdk";
      const sub = client(server.url, "slow", { WebSocket: TappedWS as any });
      const pub = client(server.url, "fast");
      const got: string[] = [];
      const notices: string[] = [];
      sub.room(room).on("message", (m) => got.push(m.id!));
      sub.room(room).on("system", (m) => {
        if (m.data?.event === "overflow") notices.push(m.data.since);
      });
      await withTimeout(sub.room(room).join(), 10_000, "sub join");
      await withTimeout(pub.room(room).join({ self: false }), 10_000, "pub join");
      const tcp = sockets[sockets.length - 1]._socket;
      tcp.pause();
      const N = 600;
      const pad = "x".repeat(32 * 1024 - 200);
      const acked: string[] = [];
      for (let i = 0; i < N; i++) acked.push((await pub.room(room).send({ n: i, pad })).id);
      tcp.resume();
      await waitFor("every acked message delivered", () => new Set(got).size >= N, 30_000);
      await new Promise((r) => setTimeout(r, 300)); // a straggler duplicate would show up here
      console.log(`overflow case: acked=${acked.length} delivered=${got.length} notices=${notices.length}`);
      expect(notices.length).toBeGreaterThan(0); // else the slow reader dropped nothing: proves nothing
      expect(got.length).toBe(N); // each once
      expect([...got].sort()).toEqual([...acked].sort());
      // A later reconnect resumes from the newest id: nothing is replayed again.
      expect(sub.room(room).lastMessageId).toBe(acked[N - 1]);
      sub.close();
      pub.close();
    } finally {
      await server.stop();
    }
  });

  it.skipIf(!HAVE_REDIS)(
    "sends in flight when the publisher's instance is SIGKILLed resolve after the reconnect, each stored once",
    async () => {
      const redis = await startRedis();
      const env = {
        RTGATE_BROKER__KIND: "redis",
        RTGATE_REDIS__URL: redis.url,
        RTGATE_WS__RATE_LIMIT_PER_SEC: "100000",
        RTGATE_WS__RATE_LIMIT_BURST: "100000",
      };
      const a = await startServer("127.0.0.1:0", env);
      let b = await startServer("127.0.0.1:0", env);
      const bPort = b.port;
      try {
        const room = "public:resend";
        const sub = client(a.url, "watcher");
        const pub = client(b.url, "writer");
        const got: Envelope[] = [];
        sub.room(room).on("message", (m) => got.push(m));
        await withTimeout(sub.room(room).join(), 10_000, "sub join");
        await withTimeout(pub.room(room).join({ self: false }), 10_000, "pub join");
        const N = 1000;
        const results: (string | Error)[] = [];
        let acks = 0;
        let ackedBeforeKill = 0;
        const victim = b;
        const sends = Array.from({ length: N }, (_, i) =>
          pub
            .room(room)
            .send({ n: i })
            .then(
              ({ id }) => {
                results[i] = id;
                // Kill the publisher's instance while most of the burst is in flight.
                if (++acks === 20) {
                  ackedBeforeKill = acks;
                  victim.proc.kill("SIGKILL");
                }
              },
              (e) => (results[i] = e),
            ),
        );
        await waitFor("the kill", () => ackedBeforeKill > 0, 10_000);
        await b.stop();
        b = await startServer(`127.0.0.1:${bPort}`, env);
        await withTimeout(Promise.all(sends), 30_000, "every send settles");
        const failures = results.filter((r) => typeof r !== "string");
        expect(failures).toEqual([]);
        await waitFor("sub has every message", () => got.length >= N, 20_000);
        await new Promise((r) => setTimeout(r, 300));
        const ns = got.map((m) => m.data.n as number);
        const metrics = await (await fetch(`http://127.0.0.1:${bPort}/metrics`)).text();
        const repeats = /^rtgate_idempotent_repeats_total (\d+)/m.exec(metrics)?.[1] ?? "0";
        console.log(
          `resend case: acked before the kill=${ackedBeforeKill} of ${N}; delivered=${got.length}; ` +
            `resends answered as repeats (stored before the kill)=${repeats}`,
        );
        expect(got.length).toBe(N); // nothing published twice
        expect(new Set(ns).size).toBe(N);
        // Each send resolved with the id its one message carries.
        const idOf = new Map(got.map((m) => [m.data.n as number, m.id!]));
        for (let i = 0; i < N; i++) expect(results[i]).toBe(idOf.get(i));
        sub.close();
        pub.close();
      } finally {
        await a.stop();
        await b.stop();
        await stopProc(redis.proc);
      }
    },
  );

  it("a send to a frozen server rejects with code timeout", async () => {
    const server = await startServer();
    try {
      const c = client(server.url, "dave", { ackTimeoutMs: 300 });
      const errors: string[] = [];
      c.on("error", (e: any) => errors.push(`${e.code}: ${e.message}`));
      const r = c.room("public:frozen");
      await withTimeout(r.join(), 5000, "join").catch((e) => {
        throw new Error(`join failed: ${e} (client errors: ${errors.join("; ")})`);
      });
      await withTimeout(r.send({ text: "before" }), 5000, "send before").catch((e) => {
        throw new Error(`send before freeze failed: ${e.code ?? ""} ${e} (client errors: ${errors.join("; ")})`);
      });
      server.proc.kill("SIGSTOP");
      // The signal is asynchronous: send only once the process is stopped (state T), or the
      // server may still answer.
      await waitStopped(server.proc.pid!);
      try {
        const started = Date.now();
        const err: any = await withTimeout(r.send({ text: "while frozen" }).then(() => null, (e) => e), 5000, "send");
        expect(err).toBeInstanceOf(Error);
        expect(err.code).toBe("timeout");
        expect(Date.now() - started).toBeGreaterThanOrEqual(250);
      } finally {
        server.proc.kill("SIGCONT");
      }
      // The connection survives the freeze.
      await expect(withTimeout(r.send({ text: "after" }), 5000, "send after")).resolves.toMatchObject({
        id: expect.stringMatching(/^\d+-\d+$/),
      });
      c.close();
    } finally {
      await server.stop();
    }
  });
});

/** Waits (at most 2 s) until the process `pid` is stopped, as /proc/<pid>/stat says. */
async function waitStopped(pid: number): Promise<void> {
  const deadline = Date.now() + 2000;
  while (Date.now() < deadline) {
    const stat = readFileSync(`/proc/${pid}/stat`, "utf8");
    // "pid (comm) state ...": the state follows the last ')'.
    if (stat.slice(stat.lastIndexOf(")") + 2).startsWith("T")) return;
    await new Promise((r) => setTimeout(r, 5));
  }
  throw new Error(`process ${pid} did not stop within 2 s`);
}
