/** The built artifacts (run `npm run build` first; `npm test` does). */
import { existsSync, readFileSync } from "node:fs";
import { dirname, resolve } from "node:path";
import { fileURLToPath } from "node:url";
import { describe, expect, it } from "vitest";
import { FakeWebSocket } from "./fake-ws.js";

const dist = resolve(dirname(fileURLToPath(import.meta.url)), "../../dist");
const built = existsSync(resolve(dist, "rtgate.browser.js"));

describe.skipIf(!built)("dist", () => {
  it("has the ESM entry, its declarations and a self-contained browser bundle", async () => {
    expect(readFileSync(resolve(dist, "index.d.ts"), "utf8")).toMatch(/export declare function connect/);
    const bundle = readFileSync(resolve(dist, "rtgate.browser.js"), "utf8");
    expect(bundle).not.toMatch(/\bimport\s*[^(]*\bfrom\b/); // nothing left to resolve
    for (const file of ["index.js", "rtgate.browser.js"]) {
      const mod = await import(resolve(dist, file));
      expect(typeof mod.connect).toBe("function");
      FakeWebSocket.reset();
      const c = mod.connect("ws://x/api/v1/ws", { token: "t" }, { WebSocket: FakeWebSocket });
      await new Promise((r) => setTimeout(r, 0));
      FakeWebSocket.last().accept();
      expect(c.state).toBe("open");
      c.close();
    }
  });
});
