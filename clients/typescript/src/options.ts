/**
 * The types an application hands the client (`createClient`'s options, an entity's options and
 * ids) and is handed back (a refused write). A module of their own, so that every layer of the
 * client names them without importing the client.
 */
import type { Mutation, Row } from "./store.js";

export interface ClientOptions {
  /** The gateway, e.g. `https://sync.example.com` (the socket is `/ws/sync` there). */
  url: string;
  token?: string;
  /** Called for a token at start and before the current one expires. */
  getToken?: () => string | Promise<string>;
  /** The origin tag of this profile's writes (default: one made up and kept per profile). */
  clientId?: string;
  /** A write the server refused because the row was not as expected (409). Its optimistic
   * state is already rolled back (the server wins); write again to merge. Same as
   * `client.onConflict(handler)`. */
  onConflict?: (conflict: Refusal) => void;
  /** A write refused by row-level security, privileges or as malformed (403, 400). */
  onRejected?: (rejection: Refusal) => void;
  /** Failures that do not stop the client: storage refused (it goes on from memory), an entity
   * that cannot be fetched, a socket that failed. */
  onError?: (error: unknown) => void;
  /** Retries (reconnects, writes, snapshots) wait a random time up to `baseMs`·2^attempt, at
   * most `capMs` (defaults 1 s and 32 s), and never less than a server's `Retry-After`. */
  retry?: { baseMs?: number; capMs?: number };
  /** How often an entity the user may not read (ERROR `forbidden`, a 403) is asked again
   * (default 5 minutes; `Infinity`: only at each new socket, where it is always asked): a
   * GRANT is not announced to clients. */
  recheckForbiddenMs?: number;
  /** Store snapshots from a Web Worker (default true; without one, or where workers cannot
   * start, the page stores them). */
  worker?: boolean;
}

export interface Refusal {
  mutation: Mutation;
  status: number;
  error: string;
  /** For a conflict: the row as it is on the server. */
  current?: Row;
}

export interface EntityOptions {
  /** The key column(s), as the gateway forms entity ids (default `id`). */
  key?: string | string[];
  /** `delta` (default): changes carry the rows; `invalidate`: changed rows are fetched again. */
  mode?: "delta" | "invalidate";
}

/** An entity id: the key's value (`7`, `"7"`, a uuid) or, for a composite key, its values in order. */
export type Id = string | number | (string | number)[];
