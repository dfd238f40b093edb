/**
 * Whether the stream has passed a cursor. Cursors are opaque to applications, but this client
 * must know when the live stream has delivered its own write (whose answer carries a cursor)
 * before it drops that write's optimistic state. A cursor is a snapshot of the log (see the
 * repository's core/src/cursor.rs): `1.<generation>.<mark>` between batches, or
 * `1.<generation>.<from>.<to>.<txkey>.<txid>.<id>` inside one; a mark is
 * `<xmin>_<xmax>_<xip-xip…>_<maxId>_<nextXid>`, where a run of in-progress xids may be written
 * `first~last` (a standby's marks).
 */

/** In-progress xids as inclusive runs `[first, last]`. */
type Runs = [bigint, bigint][];

interface Mark {
  xmin: bigint;
  xmax: bigint;
  xip: Runs;
  maxId: bigint;
}

interface Cursor {
  generation: string;
  /** Every change before this mark is before the cursor. */
  after: Mark;
  /** No change after this mark is before the cursor. */
  end: Mark;
}

function mark(text: string | undefined): Mark | undefined {
  const parts = text?.split("_");
  if (parts?.length !== 5) return undefined;
  const [xmin, xmax, xip, maxId] = parts as [string, string, string, string];
  try {
    return {
      xmin: BigInt(xmin),
      xmax: BigInt(xmax),
      xip: xip
        ? xip.split("-").map((part): [bigint, bigint] => {
            const [first = "", last = first] = part.split("~");
            return [BigInt(first), BigInt(last)];
          })
        : [],
      maxId: BigInt(maxId),
    };
  } catch {
    return undefined;
  }
}

function parse(text: string): Cursor | undefined {
  const [version, generation, first, second, ...rest] = text.split(".");
  const from = mark(first);
  if (version !== "1" || !generation || !from) return undefined;
  if (second === undefined) return { generation, after: from, end: from };
  const to = mark(second);
  return to && rest.length === 3 ? { generation, after: from, end: to } : undefined;
}

/** Whether the runs `outer` hold every xid of `[first, last]`. */
function holds(outer: Runs, first: bigint, last: bigint): boolean {
  for (const [a, b] of [...outer].sort((x, y) => (x[0] < y[0] ? -1 : 1))) {
    if (first > last) break;
    if (a > first) return false;
    if (b >= first) first = b + 1n;
  }
  return first > last;
}

/** Every transaction visible in `earlier` is visible in `later`: every xid `later` still
 * has in progress below `earlier.xmax` is in progress in `earlier` too. */
function covers(later: Mark, earlier: Mark): boolean {
  return (
    later.xmax >= earlier.xmax &&
    later.xip.every(([first, last]) => first >= earlier.xmax || holds(earlier.xip, first, last < earlier.xmax ? last : earlier.xmax - 1n))
  );
}

/**
 * True when every change before `target` is before `position` (a cursor the stream delivered).
 * Conservative inside a batch: it may answer false a little longer than needed, never true
 * too early. False for cursors it cannot read or of another log.
 */
export function reaches(position: string, target: string): boolean {
  const p = parse(position);
  const t = parse(target);
  if (!p || !t || p.generation !== t.generation) return false;
  return covers(p.after, t.end) && p.after.maxId >= t.end.maxId;
}
