// The demo page in headless Chromium: two pages on two rtgate instances (Redis broker) chat
// and see each other's presence. Saves a screenshot under target/.
//
// Needs: target/debug/rtgate (or $RTGATE_BIN), redis-server, chromium (/usr/bin/chromium or
// $CHROMIUM). With CI=true a missing one fails the test; otherwise it is skipped.

import { test } from "node:test";
import assert from "node:assert/strict";
import { spawn, execFileSync } from "node:child_process";
import { existsSync, mkdirSync } from "node:fs";
import { createServer } from "node:net";
import path from "node:path";
import { fileURLToPath } from "node:url";
import { chromium } from "playwright-core";

const root = path.resolve(path.dirname(fileURLToPath(import.meta.url)), "../..");
const rtgate = process.env.RTGATE_BIN || path.join(root, "target/debug/rtgate");
const browserPath = process.env.CHROMIUM || "/usr/bin/chromium";
const children = [];

function missing() {
  const gone = [];
  if (!existsSync(rtgate)) gone.push(rtgate);
  if (!existsSync(browserPath)) gone.push(browserPath);
  try {
    execFileSync("redis-server", ["--version"]);
  } catch {
    gone.push("redis-server");
  }
  return gone;
}

function freePort() {
  return new Promise((resolve, reject) => {
    const srv = createServer();
    srv.listen(0, "127.0.0.1", () => {
      const { port } = srv.address();
      srv.close(() => resolve(port));
    });
    srv.on("error", reject);
  });
}

/** Starts a child and resolves once `ready` appears in its output (bounded). */
function start(cmd, args, env, ready) {
  return new Promise((resolve, reject) => {
    const child = spawn(cmd, args, { env, stdio: ["ignore", "pipe", "pipe"] });
    children.push(child);
    let out = "";
    const timer = setTimeout(() => reject(new Error(`${cmd} not ready:\n${out}`)), 15000);
    const onData = (d) => {
      out += d;
      if (out.includes(ready)) {
        clearTimeout(timer);
        resolve(child);
      }
    };
    child.stdout.on("data", onData);
    child.stderr.on("data", onData);
    child.on("exit", (code) => reject(new Error(`${cmd} exited ${code}:\n${out}`)));
  });
}

async function gateway(redisPort, id) {
  const port = await freePort();
  const env = Object.fromEntries(Object.entries(process.env).filter(([k]) => !k.startsWith("RTGATE_")));
  Object.assign(env, {
    RTGATE_SERVER__LISTEN: `127.0.0.1:${port}`,
    RTGATE_SERVER__INSTANCE_ID: id,
    // The demo page is off by default once a secret is configured: this test needs it.
    RTGATE_SERVER__DEMO: "true",
    // At least 32 bytes: rtgate refuses shorter HS256 secrets (exit 2).
    RTGATE_AUTH__JWT_SECRET: "e2e-secret-0123456789abcdef012345",
    // Both pages connect from 127.0.0.1: no per-address upgrade limit.
    RTGATE_SERVER__CONNECT_RATE_PER_IP: "0",
    RTGATE_BROKER__KIND: "redis",
    RTGATE_REDIS__URL: `redis://127.0.0.1:${redisPort}`,
  });
  await start(rtgate, ["serve"], env, "listening on");
  return `http://127.0.0.1:${port}`;
}

test("two pages on two instances chat and see each other's presence", async (t) => {
  const gone = missing();
  if (gone.length) {
    if (process.env.CI === "true") assert.fail(`CI=true but missing: ${gone.join(", ")}`);
    t.skip(`missing: ${gone.join(", ")}`);
    return;
  }
  const redisPort = await freePort();
  await start("redis-server", ["--port", String(redisPort), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"], process.env, "Ready to accept");
  const a = await gateway(redisPort, "instance-a");
  const b = await gateway(redisPort, "instance-b");

  const browser = await chromium.launch({
    executablePath: browserPath,
    args: ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
      "--disable-background-networking", "--disable-component-update", "--disable-sync"],
  });
  try {
    const alice = await browser.newPage();
    const bob = await browser.newPage();
    await alice.goto(`${a}/?user=alice`);
    await bob.goto(`${b}/?user=bob`);
    for (const [page, instance] of [[alice, "instance-a"], [bob, "instance-b"]]) {
      await page.waitForFunction((id) => document.getElementById("instance").textContent === id, instance, { timeout: 10000 });
      await page.waitForFunction(() => document.getElementById("instances").textContent === "2", null, { timeout: 10000 });
    }
    // Presence: each sees both people.
    for (const page of [alice, bob]) {
      await page.waitForFunction(() => {
        const people = [...document.querySelectorAll("#people li")].map((li) => li.textContent);
        return people.includes("alice") && people.includes("bob");
      }, null, { timeout: 10000 });
    }
    // Chat across instances, both ways.
    await alice.fill("#text", "hello from A");
    await alice.click("#send-form button");
    await bob.fill("#text", "hi from B");
    await bob.click("#send-form button");
    for (const page of [alice, bob]) {
      await page.waitForFunction(() => {
        const log = document.getElementById("log").textContent;
        return log.includes("alicehello from A") && log.includes("bobhi from B");
      }, null, { timeout: 10000 });
    }
    // A page opened later shows what was said before, from the history call.
    const carol = await browser.newPage();
    await carol.goto(`${a}/?user=carol`);
    await carol.waitForFunction(() => {
      const log = document.getElementById("log").textContent;
      return log.includes("alicehello from A") && log.includes("bobhi from B");
    }, null, { timeout: 10000 });
    mkdirSync(path.join(root, "target"), { recursive: true });
    const shot = path.join(root, "target", "e2e-demo.png");
    await bob.screenshot({ path: shot, fullPage: true });
    assert.ok(existsSync(shot));
  } finally {
    await browser.close();
    for (const c of children) c.kill("SIGKILL");
  }
});
