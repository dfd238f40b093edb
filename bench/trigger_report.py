"""Turns trigger.csv and bulk.csv into the Markdown report bench/results/trigger.md."""
import csv
import os
import platform
import subprocess
import sys

out, seconds = sys.argv[1], sys.argv[2]
tps = {(r["variant"], r["durability"], r["clients"]): float(r["tps"] or 0)
       for r in csv.DictReader(open(os.path.join(out, "trigger.csv")))}
bulk = {r["variant"]: float(r["seconds"]) for r in csv.DictReader(open(os.path.join(out, "bulk.csv")))}
pg = subprocess.run(["psql", "-qAt", "-c", "SHOW server_version"], capture_output=True, text=True).stdout.strip()
mem_gib = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30

print("# Capture benchmark\n")
print(f"Machine: {os.cpu_count()} cores, {mem_gib:.0f} GiB, {platform.platform()}; PostgreSQL {pg}; "
      f"shared_buffers=1GB, pg_sync preloaded. pgbench, {seconds} s per run, single-row "
      "UPDATE transactions on a 100k-row table. `tracked` is pg_sync's capture, `audit` the "
      "PL/pgSQL audit trigger of sql/bench/audit_trigger.sql.\n")
print("| durability | clients | untracked TPS | pg_sync TPS | PL/pgSQL audit TPS | pg_sync / untracked | pg_sync / audit |")
print("| --- | --- | --- | --- | --- | --- | --- |")
for durability in ("on", "off"):
    for clients in ("2", "8"):
        p, t, a = (tps[(v, durability, clients)] for v in ("plain", "tracked", "audit"))
        label = "durable" if durability == "on" else "synchronous_commit=off"
        print(f"| {label} | {clients} | {p:.0f} | {t:.0f} | {a:.0f} | {t / p:.2f}× | {t / a:.2f}× |")
print("\nOne UPDATE of all 100k rows (best of 3):\n")
print("| untracked | pg_sync | PL/pgSQL audit | pg_sync / untracked |")
print("| --- | --- | --- | --- |")
print(f"| {bulk['plain']:.2f} s | {bulk['tracked']:.2f} s | {bulk['audit']:.2f} s | {bulk['tracked'] / bulk['plain']:.2f}× |")
