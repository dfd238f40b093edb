/**
 * What the client tells the app about its sync: a status object in the spirit of PowerSync's
 * (`connected`, `hasSynced`, uploading/downloading, the last error), derived from facts the
 * leading tab knows and shared with every tab, including tabs that open later. `status`, the
 * one-word summary, stays for applications written against the first API. Pure.
 */

/** The one-word summary: `live` when connected and caught up, `offline` when the browser is
 * offline or the gateway cannot be reached, `connecting` otherwise. */
export type Status = "connecting" | "live" | "offline";

export interface EntityStatus {
  /** Its rows were fetched whole at least once on this device (they may be old, not empty by mistake). */
  hasSynced: boolean;
  /** Caught up with the live stream on the current connection. */
  live: boolean;
  /** Fetching a snapshot or replaying missed changes. */
  downloading: boolean;
  /** Why it is not synced, e.g. `forbidden` (the user may not read it: its local rows are gone). */
  error?: string;
}

export interface SyncStatus {
  status: Status;
  /** The socket (of the leading tab) is open. */
  connected: boolean;
  /** Every entity has `hasSynced`. */
  hasSynced: boolean;
  entities: Record<string, EntityStatus>;
  /** Writes are being sent. */
  uploading: boolean;
  /** Some entity is downloading. */
  downloading: boolean;
  /** Writes made on this device that the server has not applied yet. */
  pendingWrites: number;
  /** The last failure (socket, snapshot, write, storage) and when, in ms since the epoch. */
  lastError?: { message: string; at: number };
  /** The client is closed: `close()`, sign-out in any tab, or a token for another user. */
  closed: boolean;
}

/** What the leading tab knows. */
export interface Facts {
  online: boolean;
  socket: "open" | "opening" | "down";
  /** The last attempt to connect failed (the gateway could not be reached). */
  failed: boolean;
  entities: Record<string, EntityStatus>;
  uploading: boolean;
  pendingWrites: number;
  lastError?: { message: string; at: number };
  closed: boolean;
}

export function derive(f: Facts): SyncStatus {
  const entities = Object.values(f.entities);
  const connected = f.socket === "open" && !f.closed;
  const status: Status = f.closed
    ? "offline"
    : connected
      ? entities.every((e) => e.live || e.error)
        ? "live"
        : "connecting"
      : !f.online || f.failed
        ? "offline"
        : "connecting";
  return {
    status,
    connected,
    hasSynced: entities.every((e) => e.hasSynced),
    entities: f.entities,
    uploading: f.uploading,
    downloading: entities.some((e) => e.downloading),
    pendingWrites: f.pendingWrites,
    lastError: f.lastError,
    closed: f.closed,
  };
}

/** Two statuses say the same. */
export const sameStatus = (a: SyncStatus, b: SyncStatus) => JSON.stringify(a) === JSON.stringify(b);
