/** A scriptable stand-in for the WebSocket API, injected through the `WebSocket` option. */
export class FakeWebSocket {
  static instances: FakeWebSocket[] = [];
  static reset(): void {
    FakeWebSocket.instances = [];
  }
  static last(): FakeWebSocket {
    const ws = FakeWebSocket.instances[FakeWebSocket.instances.length - 1];
    if (!ws) throw new Error("no socket created");
    return ws;
  }

  readyState = 0;
  sent: any[] = [];
  closedWith: { code?: number; reason?: string } | null = null;
  onopen: ((ev: any) => any) | null = null;
  onmessage: ((ev: { data: any }) => any) | null = null;
  onclose: ((ev: { code: number; reason: string }) => any) | null = null;
  onerror: ((ev: any) => any) | null = null;

  constructor(public url: string) {
    FakeWebSocket.instances.push(this);
  }

  get token(): string | null {
    return new URL(this.url).searchParams.get("token");
  }

  send(data: string): void {
    if (this.readyState !== 1) throw new Error("socket not open");
    this.sent.push(JSON.parse(data));
  }

  close(code?: number, reason?: string): void {
    this.closedWith = { code, reason };
    this.readyState = 3;
  }

  /* ---- the "server" side ---- */

  /** Opens the socket and sends `welcome`. */
  accept(user = "u1"): void {
    this.readyState = 1;
    this.onopen?.({});
    this.push({ type: "welcome", room: null, data: { user_id: user, instance_id: "i1", session_id: "i1:1" } });
  }

  push(frame: unknown): void {
    this.onmessage?.({ data: JSON.stringify(frame) });
  }

  serverClose(code: number, reason = ""): void {
    this.readyState = 3;
    this.onclose?.({ code, reason });
  }

  /** Frames sent by the client of a given type. */
  sentOf(type: string): any[] {
    return this.sent.filter((f) => f.type === type);
  }

  lastSent(): any {
    return this.sent[this.sent.length - 1];
  }

  ack(frame: { ref: string; room?: string }, data: unknown = {}): void {
    this.push({ type: "ack", room: frame.room ?? null, data, ref: frame.ref });
  }

  fail(frame: { ref: string; room?: string }, code: string, message = code): void {
    this.push({ type: "error", room: frame.room ?? null, data: { code, message }, ref: frame.ref });
  }
}

let seq = 0;
export function msg(room: string, id: string, data: unknown = {}): any {
  return { type: "message", room, id, data, ts: new Date(0).toISOString(), sender_id: "u2", n: seq++ };
}
