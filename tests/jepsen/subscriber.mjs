// A subscriber for tests/jepsen.rs, through the SDK's browser bundle and Node's WebSocket.
// usage: node --experimental-websocket subscriber.mjs BUNDLE WS_URL TOKEN ROOM
// Prints one JSON line per event: {"ready":true} once joined, {"id","p","seq"} per message,
// {"gap":...} per history_gap, {"state":...} per connection state. Exits when stdin closes,
// after printing {"done":true}.
import { pathToFileURL } from "node:url";

const [bundle, url, token, room] = process.argv.slice(2);
if (!bundle || !url || !token || !room) {
  console.error("usage: subscriber.mjs BUNDLE WS_URL TOKEN ROOM");
  process.exit(2);
}
const { connect } = await import(pathToFileURL(bundle).href);
if (typeof WebSocket === "undefined") {
  console.error("no global WebSocket: run node with --experimental-websocket (Node 20) or Node >= 22");
  process.exit(2);
}

const out = (v) => process.stdout.write(JSON.stringify(v) + "\n");
const client = connect(url, { token }, { minDelayMs: 50, maxDelayMs: 500, ackTimeoutMs: 5000 });
client.on("state", (s) => out({ state: s, t: Date.now() }));
client.on("error", (e) => out({ error: e.code, message: e.message, t: Date.now() }));
const r = client.room(room);
r.on("message", (m) => out({ id: m.id, p: m.data?.p, seq: m.data?.seq }));
r.on("gap", (g) => out({ gap: g.since ?? null, t: Date.now() }));
await r.join({ self: true });
out({ ready: true });

process.stdin.resume();
process.stdin.on("end", () => {
  out({ done: true, last: r.lastMessageId ?? null });
  client.close();
  process.exit(0);
});
