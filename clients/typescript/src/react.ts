/** `@pg-sync/client/react`: `useLiveQuery`, on React's `useSyncExternalStore`. A separate entry
 * point, so that the core costs nothing more for applications without React. */
import { useCallback, useMemo, useRef, useSyncExternalStore } from "react";
import type { Entity } from "./client.js";
import type { Filter, QueryOptions } from "./query.js";
import type { Row } from "./store.js";

/** The entity's rows (matching `filter`, in `options.orderBy`'s order, at most `options.limit`),
 * re-rendering whenever they change. Pass a stable `filter` (memoised or defined outside the
 * component); `options` may be a new object each render. */
export function useLiveQuery(entity: Entity, filter?: Filter, options: QueryOptions = {}): Row[] {
  const rows = useRef<Row[] | undefined>(undefined);
  const key = JSON.stringify(options);
  // The same options as long as their content is the same (`key`).
  const stable = useMemo(() => JSON.parse(key) as QueryOptions, [key]);
  const subscribe = useCallback(
    (onChange: () => void) => {
      rows.current = undefined;
      return entity.subscribe(
        filter,
        (next) => {
          rows.current = next;
          onChange();
        },
        stable,
      );
    },
    [entity, filter, stable],
  );
  const current = () => (rows.current ??= filter ? entity.where(filter, stable) : entity.all(stable));
  return useSyncExternalStore(subscribe, current, current);
}
