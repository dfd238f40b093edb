/**
 * The token: fetched again before it expires (`getToken`), and never another user's. Rows
 * fetched under other claims may not be the user's to see now, so they are forgotten and
 * fetched again (`checkAccess`).
 */
import { StreamState } from "./stream-state.js";

type Claims = { sub?: string; exp?: number } & Record<string, unknown>;

/** The claims of a JWT (unverified: only to name the local database and plan refreshes). */
export function claims(token: string): Claims {
  try {
    const part = token.split(".")[1] ?? "";
    return JSON.parse(atob(part.replace(/-/g, "+").replace(/_/g, "/"))) as Claims;
  } catch {
    return {};
  }
}

/** What decides which rows a token may see: every claim but the times and the token's id. */
function access(token: string): string {
  const all = claims(token);
  return JSON.stringify(
    Object.keys(all)
      .filter((k) => !["exp", "iat", "nbf", "jti"].includes(k))
      .sort()
      .map((k) => [k, all[k]]),
  );
}

export abstract class Auth extends StreamState {
  protected sub = "";
  protected token = "";
  /** What the token allowed when the stored rows were fetched (see `access`). */
  protected accessSeen?: string;

  protected async freshToken(): Promise<string> {
    const exp = claims(this.token).exp;
    if (this.options.getToken && (!this.token || (exp && exp * 1000 - Date.now() < 60000))) {
      const token = await this.options.getToken();
      if (this.sub && claims(token).sub !== this.sub) {
        // Another user: this user's rows and writes must not travel under their token.
        this.shutdown();
        throw new Error("pg-sync: the token is for another user; make a new client for them");
      }
      this.token = token;
      if (this.leading) this.checkAccess();
    }
    return this.token || this.options.token || "";
  }

  /** Rows fetched under other claims (another role, other claims the policies read) may not
   * be the user's to see now: forget them all and fetch again. */
  protected checkAccess(): void {
    const now = access(this.token || this.options.token || "");
    if (now === this.accessSeen) return;
    const before = this.accessSeen;
    this.accessSeen = now;
    if (before !== undefined) {
      const entities = new Set([...this.meta.keys(), ...this.followed.keys()]);
      this.forbidden.clear();
      this.commit([...entities].map((entity) => ({ entity, drop: true, meta: null })));
      this.socket?.close(4000, "the token's claims changed");
    }
    this.chain(() => this.store.write(new Map(), undefined, now));
  }

  /** Stops this tab's client (leader.ts). */
  protected abstract shutdown(): void;
}
