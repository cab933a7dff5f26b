// Types of gatecast.js, the browser client of the gatecast push gateway.
// Documentation: docs/client.md.

/** Where the client is: see docs/client.md, "States". */
export type State = 'connecting' | 'connected' | 'disconnected' | 'closed';

/** A `state` event. */
export interface StateEvent {
  state: State;
  /** `connecting`: how many failed attempts came before this one (since the last reset). */
  attempt?: number;
  /** `connected`: the new connection's client_id. */
  clientId?: string | null;
  /** `disconnected` / `closed`: the close code (1006 when the connection was lost or never opened; 0 when no socket was made). */
  code?: number;
  /** `disconnected` / `closed`: the close reason, as sent by the server or set by the client. */
  reason?: string;
  /** `disconnected`: milliseconds until the next attempt. */
  delay?: number;
  /** When the server asked for a delay in a JSON close reason: the delay it asked for. */
  retryMs?: number;
}

/** Where a push stands in its stream (recovery connections, pushes kept in history). */
export interface Position {
  /** `u:<uid>`, `g:<group>` or `all`. */
  stream: string;
  epoch: string;
  offset: number;
}

/** A `recovered` event: recovery after a reconnect or a reload is over. */
export interface RecoveredEvent {
  /** true: uid, groups and session restored; false: they were not; undefined: no resume token was sent. */
  resumed?: boolean;
  /** Each stream whose position was sent, and each stream kept in history that the connection is in but had no position for: true if every missed push was replayed. */
  streams: Record<string, boolean>;
}

/** A `discontinuity` event: pushes may have been missed; resync from your backend. */
export interface DiscontinuityEvent {
  resumed?: boolean;
  /** The streams that were not recovered. */
  streams: string[];
}

export interface Options {
  /** The client JWT, sent as `?token=`. */
  token?: string;
  /** Returns a fresh JWT: called before the first attempt when `token` is not given, before an attempt when the token has expired, and after a refusal (4001, 1008, a failed handshake). */
  getToken?: () => string | Promise<string>;
  /** Opt in to recovery (docs/recovery.md): resume token and positions kept in sessionStorage. */
  recover?: boolean;
  /** Smallest reconnect delay, ms (default 500). */
  minDelay?: number;
  /** Largest reconnect delay, ms (default 20000). */
  maxDelay?: number;
  /** A connection that lives this long (ms) resets the backoff (default 10000). */
  resetAfter?: number;
  /** Application ping every this many ms (default 25000). */
  pingInterval?: number;
  /** No frame within this many ms of a ping: the connection is replaced (default 10000). */
  pongTimeout?: number;
  /** No welcome within this many ms of an attempt: it is abandoned (default 10000). */
  connectTimeout?: number;
  /** Where recovery keeps its state (default sessionStorage; null: memory only). */
  storage?: Pick<Storage, 'getItem' | 'setItem'> | null;
  /** The storage key (default `gatecast:` + the URL without its query). */
  storageKey?: string;
  /** The WebSocket class (default the global one). */
  WebSocket?: unknown;
  /** Where `online` and `visibilitychange` are listened for (default the global window; null: nowhere). */
  window?: unknown;
  /** Random numbers in [0, 1) for the jitter (default Math.random). */
  random?: () => number;
}

export interface Client {
  /** The current connection's client_id (null before the first welcome). */
  readonly clientId: string | null;
  readonly state: State;
  on(event: 'message', handler: (data: string | ArrayBuffer, position?: Position) => void): () => void;
  on(event: 'clientId', handler: (clientId: string) => void): () => void;
  on(event: 'state', handler: (event: StateEvent) => void): () => void;
  on(event: 'recovered', handler: (event: RecoveredEvent) => void): () => void;
  on(event: 'discontinuity', handler: (event: DiscontinuityEvent) => void): () => void;
  off(event: string, handler: (...args: any[]) => void): void;
  /** Sends a business message on the current connection; false when not connected. */
  send(data: string | ArrayBuffer | ArrayBufferView | Blob): boolean;
  /** Closes for good (no reconnect). */
  close(): void;
}

/** Connects to `url` (ws:, wss:, http:, https: or relative; or a function returning one per attempt). */
export function connect(url: string | (() => string), options?: Options): Client;

/** The delay before reconnect attempt `attempt`: uniform in [min, min(max, min·2^(attempt+1))]. */
export function backoff(attempt: number, min: number, max: number, random?: () => number): number;
/** Parses a JSON close reason `{"reason":..,"retry_ms":N}`. */
export function closeReason(text: string): { reason: string; retryMs?: number } | null;
/** Splits a recovery frame into a control frame or a header and its payload. */
export function splitFrame(
  data: string | ArrayBuffer,
): { control: any } | { header: { s?: string; e?: string; o?: number } | null; data: string | ArrayBuffer };
/** Records a push's position in `seen` and `pos` (default: the same map); false for a push already seen. */
export function track(
  pos: Record<string, [string, number]>,
  header: { s?: string; e?: string; o?: number } | null,
  seen?: Record<string, [string, number]>,
): boolean;
/** Keeps a position (of a push or a `position` frame) unless it moves the stream back within its epoch; true when it changed. */
export function place(pos: Record<string, [string, number]>, stream: string, epoch: string, offset: number): boolean;
/** Encodes positions for `pos=`. */
export function encodePos(pos: Record<string, [string, number]>): string;
/** Whether a JWT's exp is past or within `margin` ms. */
export function tokenExpired(token: string, now?: number, margin?: number): boolean;
