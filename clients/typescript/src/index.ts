/** @pg-sync/client: see README.md. */
export { createClient, Entity, SyncClient } from "./client.js";
export type { ClientOptions, EntityOptions, Refusal, Status } from "./client.js";
export type { Condition, Filter } from "./replica.js";
export type { Mutation, Row } from "./store.js";
