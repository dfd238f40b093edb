/** `@pg-sync/client/react`: `useLiveQuery`, on React's `useSyncExternalStore`. A separate entry
 * point, so that the core costs nothing more for applications without React. */
import { useCallback, useRef, useSyncExternalStore } from "react";
import type { Entity } from "./client.js";
import type { Filter } from "./replica.js";
import type { Row } from "./store.js";

/** The entity's rows (matching `filter`), re-rendering whenever they change. Pass a stable
 * `filter` (memoised or defined outside the component). */
export function useLiveQuery(entity: Entity, filter?: Filter): Row[] {
  const rows = useRef<Row[] | undefined>(undefined);
  const subscribe = useCallback(
    (onChange: () => void) =>
      entity.subscribe(filter, (next) => {
        rows.current = next;
        onChange();
      }),
    [entity, filter],
  );
  const current = () => (rows.current ??= filter ? entity.where(filter) : entity.all());
  return useSyncExternalStore(subscribe, current, current);
}
