/**
 * This tab's copy of the rows, in every tab: entities loaded from IndexedDB together with the
 * commits not stored yet, commits applied to memory as they come (the tab's own when it
 * leads, else the leader's over the channel), and the leader's commits written to IndexedDB
 * behind, merged into as few transactions as keep up.
 */
import { merge, type Commit, type Item } from "./commit.js";
import type { EntityWrite, Meta, Row } from "./store.js";
import { Tab } from "./tab.js";

export abstract class LocalCopy extends Tab {
  /** The last commit applied to this tab's memory. */
  protected applied = 0;
  /** The last commit known to be stored. */
  private storedSeq = 0;
  /** Commits applied and not known to be stored: what a load from IndexedDB lacks. */
  protected recent: Commit[] = [];
  private loading = 0;
  /** The entities this tab holds: loaded, being loaded, or stale until commit n is stored. */
  protected readonly loads = new Map<string, "loading" | "loaded" | number>();
  /** Entities whose rows in this tab's memory are a whole sync (not nothing yet). */
  protected readonly syncedHere = new Set<string>();
  private readonly toLoad = new Set<string>();
  private readonly whenLoaded: (() => void)[] = [];
  /** The leader's: the last commit it numbered. */
  protected seq = 0;
  /** Each entity's position, as the commits so far left it. */
  protected readonly meta = new Map<string, Meta>();
  /** Store writes run one after the other; commits not yet written are merged in `unwritten`. */
  private writing: Promise<void> = Promise.resolve();
  private unwritten?: { seq: number; entities: Map<string, EntityWrite> };

  /** Loads entities into this tab's memory (those opened together, together: one state):
   * the stored rows, then the commits not stored yet. */
  private async load(codes: string[]): Promise<void> {
    codes.forEach((code) => this.loads.set(code, "loading"));
    this.loading++;
    try {
      const stored = await this.store.entities(codes);
      if (this.closed) return;
      const loaded: [string, Map<string, Row>, boolean][] = [];
      const again: string[] = [];
      for (const code of codes) {
        // Without storage, memory is all there is: the commits this tab heard.
        const rows = stored?.rows.get(code) ?? new Map<string, Row>();
        let synced = !!stored?.meta.get(code);
        let stale: number | undefined;
        for (const commit of this.recent) {
          if (commit.seq <= (stored?.seq ?? 0)) continue;
          for (const item of commit.items) {
            if (item.entity !== code) continue;
            if (item.replaced && stored) stale = commit.seq;
            if (stale !== undefined) continue;
            if (item.drop) rows.clear();
            for (const [id, row] of item.changes ?? []) {
              if (row) rows.set(id, row);
              else rows.delete(id);
            }
            if (item.meta !== undefined) synced = !!item.meta;
          }
        }
        if (stale === undefined) loaded.push([code, rows, synced]);
        else if (stale > this.storedSeq) this.loads.set(code, stale); // a new snapshot: loaded once it is stored
        else again.push(code);
      }
      for (const [code, rows, synced] of loaded) {
        this.replica.load(code, rows);
        this.loads.set(code, "loaded");
        if (synced) this.syncedHere.add(code);
        else this.syncedHere.delete(code);
      }
      if (again.length) void this.load(again);
      this.checkWaiters();
    } finally {
      this.loading--;
      this.prune();
      if (!this.loading) this.whenLoaded.splice(0).forEach((resolve) => resolve());
    }
  }

  /** Resolves when no load from IndexedDB is under way in this tab. */
  protected loaded(): Promise<void> {
    return this.loading || this.toLoad.size ? new Promise((resolve) => this.whenLoaded.push(resolve)) : Promise.resolve();
  }

  /** Loads `code` with the others opened in the same task. */
  protected loadSoon(code: string): void {
    this.toLoad.add(code);
    if (this.toLoad.size > 1) return;
    queueMicrotask(() => {
      const codes = [...this.toLoad];
      this.toLoad.clear();
      void this.load(codes);
    });
  }

  /** A commit into this tab's memory (`swapped`: entities whose new snapshot the leader
   * already put there). */
  protected applyCommit(commit: Commit, swapped?: Set<string>): void {
    if (commit.seq <= this.applied) return;
    this.applied = commit.seq;
    this.recent.push(commit);
    for (const item of commit.items) {
      if (item.meta !== undefined && !this.leading) {
        if (item.meta) this.meta.set(item.entity, item.meta);
        else this.meta.delete(item.entity);
      }
      if (this.loads.get(item.entity) !== "loaded") continue;
      if (item.replaced && !swapped?.has(item.entity)) {
        this.loads.set(item.entity, commit.seq); // stale until stored, then loaded again
        continue;
      }
      if (item.replaced) this.syncedHere.add(item.entity);
      if (item.drop) this.replica.drop(item.entity);
      for (const [id, row] of item.changes ?? []) this.replica.put(item.entity, id, row);
      if (item.meta) this.syncedHere.add(item.entity);
      else if (item.meta === null) this.syncedHere.delete(item.entity);
    }
    this.checkWaiters();
  }

  /** Commits up to `seq` are stored: loads no longer need them, stale entities load again. */
  protected storedUpTo(seq: number): void {
    this.storedSeq = Math.max(this.storedSeq, seq);
    this.prune();
    for (const [entity, state] of this.loads) {
      if (typeof state === "number" && state <= this.storedSeq) this.loadSoon(entity);
    }
    this.reloadUnsynced();
  }

  /** An entity loaded before its first snapshot was stored (this tab opened it while the
   * leader was storing it) loads again once the leader says it has synced, as stores follow. */
  protected reloadUnsynced(): void {
    for (const [entity, state] of this.loads) {
      if (state === "loaded" && !this.syncedHere.has(entity) && this.current.entities[entity]?.hasSynced) this.loadSoon(entity);
    }
  }

  private prune(): void {
    if (!this.loading) this.recent = this.recent.filter((c) => c.seq > this.storedSeq);
  }

  /** The leader's commit: into memory, to the other tabs, into storage behind. */
  protected commit(items: Item[], swapped?: Set<string>): void {
    if (!items.length || this.closed) return;
    const commit: Commit = { seq: ++this.seq, items };
    for (const item of items) {
      if (item.meta) this.meta.set(item.entity, item.meta);
      else if (item.meta === null) this.meta.delete(item.entity);
    }
    this.applyCommit(commit, swapped);
    this.tell({ t: "commit", commit });
    this.persist(commit);
    this.refreshStatus();
  }

  /** Queues a commit for the store, merged with the commits not written yet: one write runs
   * at a time and takes everything queued meanwhile, so a burst of commits costs a few
   * IndexedDB transactions, not one each, and the store is always a whole commit's state. */
  private persist(commit: Commit): void {
    let batch = this.unwritten;
    if (!batch) {
      const fresh = (batch = this.unwritten = { seq: 0, entities: new Map<string, EntityWrite>() });
      this.chain(async () => {
        if (this.unwritten === fresh) this.unwritten = undefined;
        await this.store.write(fresh.entities, fresh.seq);
        this.wrote(fresh.seq);
      });
    }
    batch.seq = commit.seq;
    merge(batch.entities, commit.items);
  }

  protected chain(step: () => Promise<void>): void {
    this.writing = this.writing.then(step).catch((e: unknown) => this.error(e));
  }

  /** Commits from now on are written after the steps chained so far. */
  protected seal(): void {
    this.unwritten = undefined;
  }

  private wrote(seq: number): void {
    if (this.closed) return;
    this.storedUpTo(seq);
    this.tell({ t: "stored", seq });
  }
}
