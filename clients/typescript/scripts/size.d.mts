/** The core's size in bytes, bundled with idb, minified and gzipped. */
export function coreSize(): Promise<number>;
