/**
 * Local queries over one entity's rows: which rows (a filter, SPEC 2.3's conditions or a
 * predicate), in what order and how many; and `LiveQuery`, the same query kept current change
 * by change, so that a sorted, limited live query over 100,000 rows costs a binary search and
 * an array splice per changed row, not a scan and a sort. Pure: no storage, no I/O.
 */
import type { Row } from "./store.js";

/** Which rows: a predicate, or conditions all of which a row meets (SPEC 2.3's filters). */
export type Filter = ((row: Row) => boolean) | Condition[];

export interface Condition {
  column: string;
  op: "eq" | "neq" | "lt" | "lte" | "gt" | "gte" | "in" | "is_null" | "not_null";
  value?: unknown;
}

/** One sort column; `desc` sorts it descending. */
export interface OrderTerm {
  column: string;
  desc?: boolean;
}

/** A column name (ascending), a term, or several (the first decides, then the next…). */
export type OrderBy = string | OrderTerm | (string | OrderTerm)[];

export interface QueryOptions {
  /** Rows in this order (ties, and queries without an order: by id for sorted queries). Values
   * compare as PostgreSQL's do for one type: numbers numerically, text by code units, `false`
   * before `true`; nulls last ascending, first descending. */
  orderBy?: OrderBy;
  /** At most this many rows (the first ones in `orderBy`'s order). */
  limit?: number;
}

/** Whether a row meets a filter, as the gateway judges it (the shared test vectors of
 * tests/vectors/filters.json): a number compares with a number or a finite numeric string, a
 * boolean with a boolean or "true"/"false", anything else as text; values that cannot be
 * compared match nothing, not even `neq`; NULL or a missing column matches only `is_null`. */
export function matches(row: Row, filter: Filter | undefined): boolean {
  if (!filter) return true;
  if (typeof filter === "function") return filter(row);
  return filter.every(({ column, op, value }) => {
    const v = row[column];
    if (op === "is_null") return v == null;
    if (op === "not_null") return v != null;
    if (op === "in") return Array.isArray(value) && value.some((x) => compareAs(v, x) === 0);
    const c = compareAs(v, value);
    if (c === undefined) return false;
    return op === "eq" ? c === 0 : op === "neq" ? c !== 0 : op === "lt" ? c < 0 : op === "lte" ? c <= 0 : op === "gt" ? c > 0 : c >= 0;
  });
}

/** A number, or a string that is a finite number (spaces around allowed). */
const numeric = (v: unknown): number | undefined =>
  typeof v === "number" ? (Number.isFinite(v) ? v : undefined) : typeof v === "string" && v.trim() && Number.isFinite(Number(v)) ? Number(v) : undefined;

const boolean = (v: unknown): boolean | undefined => (typeof v === "boolean" ? v : v === "true" ? true : v === "false" ? false : undefined);

const order = <T>(x: T, y: T) => (x < y ? -1 : x > y ? 1 : 0);

/** How a filter compares two values (undefined: they cannot be compared). */
function compareAs(a: unknown, b: unknown): number | undefined {
  if (a == null || b == null || typeof a === "object" || typeof b === "object") return undefined;
  if (typeof a === "number" || typeof b === "number") {
    const [x, y] = [numeric(a), numeric(b)];
    return x === undefined || y === undefined ? undefined : order(x, y);
  }
  if (typeof a === "boolean" || typeof b === "boolean") {
    const [x, y] = [boolean(a), boolean(b)];
    if (x !== undefined && y !== undefined) return order(Number(x), Number(y));
  }
  return order(`${a as string}`, `${b as string}`); // strings, numbers' and booleans' texts
}

/** A rank per kind of value, so that values of different kinds still sort one way. */
const rank = (v: unknown) => (typeof v === "boolean" ? 0 : typeof v === "number" ? 1 : typeof v === "string" ? 2 : 3);

/** Orders two non-null values. */
function compareValues(a: unknown, b: unknown): number {
  const ra = rank(a);
  const rb = rank(b);
  if (ra !== rb) return ra - rb;
  const [x, y] = ra === 3 ? [JSON.stringify(a), JSON.stringify(b)] : [a as number, b as number];
  return x < y ? -1 : x > y ? 1 : 0;
}

export type Entry = [id: string, row: Row];

/** The order of `orderBy` as a comparison of entries, ties broken by id: a total order, so
 * that an entry is found again by binary search. */
export function comparator(orderBy: OrderBy | undefined): (a: Entry, b: Entry) => number {
  const terms = (Array.isArray(orderBy) ? orderBy : orderBy ? [orderBy] : []).map((t) =>
    typeof t === "string" ? { column: t, desc: false } : { column: t.column, desc: !!t.desc },
  );
  return (a, b) => {
    for (const { column, desc } of terms) {
      const x = a[1][column];
      const y = b[1][column];
      // Nulls last ascending, first descending (PostgreSQL's default).
      const c = x == null ? (y == null ? 0 : 1) : y == null ? -1 : compareValues(x, y);
      if (c) return desc ? -c : c;
    }
    return a[0] < b[0] ? -1 : a[0] > b[0] ? 1 : 0;
  };
}

/** Runs a query once over `rows`. */
export function run(rows: Iterable<Entry>, filter: Filter | undefined, options: QueryOptions = {}): Row[] {
  const found: Entry[] = [];
  for (const entry of rows) if (matches(entry[1], filter)) found.push(entry);
  if (options.orderBy) found.sort(comparator(options.orderBy));
  return found.slice(0, options.limit ?? found.length).map((e) => e[1]);
}

/**
 * A query whose answer is kept current one changed row at a time. With `orderBy`, matching
 * rows are kept in a sorted array (binary search, splice): a change costs O(log n) compares
 * and one move of the array's tail, and is noticed only when it touches the first `limit` rows.
 */
export class LiveQuery {
  /** The matching rows by id (the row as last seen: how it is found again in `sorted`). */
  private readonly rows = new Map<string, Row>();
  private sorted: Entry[] = [];
  private answer: Row[] | undefined;
  private readonly compare: ((a: Entry, b: Entry) => number) | undefined;

  constructor(
    readonly filter: Filter | undefined,
    readonly options: QueryOptions = {},
  ) {
    this.compare = options.orderBy ? comparator(options.orderBy) : undefined;
  }

  /** Starts again from all of the entity's rows. */
  reset(rows: Iterable<Entry>): void {
    this.rows.clear();
    const found: Entry[] = [];
    for (const entry of rows) {
      if (matches(entry[1], this.filter)) {
        this.rows.set(entry[0], entry[1]);
        found.push(entry);
      }
    }
    if (this.compare) this.sorted = found.sort(this.compare);
    this.answer = undefined;
  }

  /** The row `id` is now `row` (undefined: gone). True when the answer changed. */
  update(id: string, row: Row | undefined): boolean {
    const old = this.rows.get(id);
    const now = row && matches(row, this.filter) ? row : undefined;
    if (old === now) return false;
    const limit = this.options.limit ?? Infinity;
    let touched = false;
    if (old) {
      this.rows.delete(id);
      if (this.compare) {
        const at = this.find([id, old]);
        this.sorted.splice(at, 1);
        touched = at < limit;
      } else {
        touched = true;
      }
    }
    if (now) {
      this.rows.set(id, now);
      if (this.compare) {
        const at = this.find([id, now]);
        this.sorted.splice(at, 0, [id, now]);
        touched ||= at < limit;
      } else {
        touched = true;
      }
    }
    if (touched) this.answer = undefined;
    return touched;
  }

  /** The answer; the same array until it changes. */
  current(): Row[] {
    if (!this.answer) {
      const limit = this.options.limit ?? Infinity;
      if (this.compare) {
        const n = Math.min(limit, this.sorted.length);
        const answer = new Array<Row>(n);
        for (let i = 0; i < n; i++) answer[i] = this.sorted[i]![1];
        this.answer = answer;
      } else {
        const answer: Row[] = [];
        for (const row of this.rows.values()) {
          if (answer.length >= limit) break;
          answer.push(row);
        }
        this.answer = answer;
      }
    }
    return this.answer;
  }

  /** Where `entry` is, or would go, in `sorted`. */
  private find(entry: Entry): number {
    let lo = 0;
    let hi = this.sorted.length;
    while (lo < hi) {
      const mid = (lo + hi) >>> 1;
      if (this.compare!(this.sorted[mid]!, entry) < 0) lo = mid + 1;
      else hi = mid;
    }
    return lo;
  }
}
