/**
 * Leader election, one socket per browser profile: of the profile's tabs, the one holding a
 * Web Lock leads (the socket, the snapshots, storage, the outbox drain), and the others hear
 * its commits and status over a BroadcastChannel. Here: a tab's start, taking the lead
 * (storing first what the last leader told but did not store), what the tabs tell each other,
 * and closing.
 */
import { claims } from "./auth.js";
import { merge } from "./commit.js";
import type { Entity } from "./entity.js";
import { Session } from "./session.js";
import { Store, type EntityWrite } from "./store.js";
import type { Note } from "./tab.js";

export abstract class Leader extends Session {
  /** The entities this tab opened (`client.entity`): followed by whichever tab leads. */
  protected readonly entities = new Map<string, Entity>();

  protected async start(): Promise<void> {
    this.token = await this.freshToken();
    // The local copy is the user's: one database per user, and no user, no database.
    const sub = claims(this.token).sub;
    if (!sub) throw new Error("pg-sync: the token has no sub (user id)");
    this.sub = sub;
    const name = (this.name = `pg-sync:${sub}@${this.base}`);
    this.store = await Store.open(
      name,
      (e) => this.error(e),
      (deleted) => (deleted ? this.shutdown() : this.error(new Error("pg-sync: a newer version opened the database in another tab"))),
    );
    // Closed while it opened (shutdown ran before the store was here): nothing more starts,
    // no channel, lock or listener is left behind.
    if (this.closed) return this.store.close();
    const outbox = await this.store.outbox();
    if (this.closed) return;
    this.replica.setPending(outbox ?? []);
    const storage = globalThis.localStorage as Storage | undefined;
    this.clientId = this.options.clientId ?? storage?.getItem(`${name}:client`) ?? crypto.randomUUID();
    storage?.setItem(`${name}:client`, this.clientId);
    if (typeof BroadcastChannel !== "undefined") {
      this.channel = new BroadcastChannel(name);
      this.channel.onmessage = (event: MessageEvent<Note>) => void this.hear(event.data);
    }
    this.facts.online = globalThis.navigator?.onLine !== false;
    globalThis.addEventListener?.("online", () => this.onlineChanged(true));
    globalThis.addEventListener?.("offline", () => this.onlineChanged(false));
    globalThis.addEventListener?.("visibilitychange", () => {
      if (document.visibilityState === "visible") this.ping(); // a slept socket shows itself
    });
    const locks = globalThis.navigator?.locks;
    if (locks) {
      // Held while this tab lives: a refusal for a write of a closed tab goes to another.
      void locks.request(`${name}:tab:${this.tab}`, () => new Promise<void>((r) => this.releases.push(r)));
      void locks.request(`${name}:leader`, () => this.lead());
    } else {
      void this.lead();
    }
    this.tell({ t: "hello" });
    void this.claimRefusals();
  }

  /** Holds the lead until the tab goes: the socket, the snapshots, the store, the outbox drain. */
  private async lead(): Promise<void> {
    if (this.closed) return;
    this.leading = true;
    const held = new Promise<void>((resolve) => this.releases.push(resolve));
    // What the last leader told the tabs but did not store, stored now (but never a new
    // snapshot's position, or anything after it, whose rows may not all be stored).
    const before = await this.store.state();
    const missing = new Map<string, EntityWrite>();
    const partial = new Set<string>();
    for (const commit of this.recent) {
      if (commit.seq <= before.seq) continue;
      for (const item of commit.items) if (item.replaced) partial.add(item.entity);
      merge(missing, commit.items.filter((item) => !partial.has(item.entity)));
    }
    this.seq = Math.max(before.seq, this.applied);
    if (missing.size) await this.store.write(missing, this.seq);
    const state = await this.store.state();
    if (this.closed) return held;
    state.meta.forEach((meta, entity) => {
      this.meta.set(entity, meta);
      this.followed.set(entity, { key: meta.key, mode: meta.mode });
    });
    this.storedUpTo(this.seq);
    this.tell({ t: "stored", seq: this.seq });
    this.accessSeen = state.claims;
    this.checkAccess();
    for (const entity of this.entities.values()) this.follow(entity.code, entity.options);
    this.tell({ t: "lead" });
    // The outbox as stored: the last leader may have settled, refused or given cursors to
    // writes since this tab last read it.
    const outbox = await this.store.outbox();
    if (outbox) this.replica.setPending(outbox);
    this.refreshStatus();
    void this.connect();
    void this.drain();
    return held;
  }

  private async hear(note: Note): Promise<void> {
    if (this.closed) return;
    switch (note.t) {
      case "commit":
        return this.applyCommit(note.commit);
      case "stored":
        return this.storedUpTo(note.seq);
      case "status":
        if (!this.leading) this.publish({ ...note.status, pendingWrites: this.pendingWrites });
        return this.reloadUnsynced();
      case "hello":
        if (this.leading) this.tell({ t: "status", status: this.current });
        return;
      case "lead":
        for (const entity of this.entities.values()) this.tell({ t: "need", entity: entity.code, options: entity.options });
        return;
      case "outbox": {
        const outbox = await this.store.outbox();
        // The leader's own pending writes may know more than storage yet (a cursor being
        // stored): those stay as they are, and storage adds the other tabs' new ones.
        const known = new Map(this.leading ? this.replica.pendingMutations().map((m) => [m.id, m]) : []);
        if (outbox) this.replica.setPending(outbox.map((m) => known.get(m.id) ?? m));
        this.refreshStatus();
        if (this.leading) void this.drain();
        return;
      }
      case "refused":
        return this.claimRefusals();
      case "need":
        if (this.leading) this.follow(note.entity, note.options);
        return;
      case "signout":
        return this.shutdown();
    }
  }

  protected override shutdown(): void {
    if (this.closed) return;
    this.closed = true;
    this.leading = false;
    this.releases.forEach((release) => release());
    this.socket?.close(1000);
    this.channel?.close();
    this.channel = undefined;
    this.store?.close();
    this.wake.abort();
    this.timers.forEach(clearTimeout);
    clearTimeout(this.txTimer);
    this.facts.closed = true;
    this.publish({ ...this.current, status: "offline", connected: false, closed: true });
    this.checkWaiters();
  }
}
