/** @pg-sync/client: see README.md. */
export { createClient, Entity, SyncClient } from "./client.js";
export type { ClientOptions, EntityOptions, Id, Refusal } from "./client.js";
export type { Condition, Filter, OrderBy, OrderTerm, QueryOptions } from "./query.js";
export type { EntityStatus, Status, SyncStatus } from "./status.js";
export type { Mutation, Row } from "./store.js";
