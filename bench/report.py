"""Turns one benchmark run's raw data (trigger.csv, bulk.csv, results.jsonl in the results
directory) into REPORT.md, results.json (everything, machine-readable) and latency.svg."""
import csv
import json
import os
import platform
import subprocess
import sys

out, seconds = sys.argv[1], sys.argv[2]


def read_csv(name):
    path = os.path.join(out, name)
    return list(csv.DictReader(open(path))) if os.path.exists(path) else []


def command(*args):
    try:
        return subprocess.run(args, capture_output=True, text=True).stdout.strip()
    except OSError:
        return "?"


runs = [json.loads(line) for line in open(os.path.join(out, "results.jsonl")) if line.strip()]
tps = {(r["variant"], r["durability"], r["clients"]): float(r["tps"] or 0) for r in read_csv("trigger.csv")}
bulk = {r["variant"]: float(r["seconds"]) for r in read_csv("bulk.csv")}


def run(mode, **match):
    """The first run of `mode` matching `match`; through a standby's bench only if `via` is named."""
    match.setdefault("via", None)
    return next((r for r in runs if r["mode"] == mode and all(r.get(k) == v for k, v in match.items())), None)


machine = {
    "cores": os.cpu_count(),
    "memory_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30),
    "platform": platform.platform(),
    "postgresql": command("/usr/lib/postgresql/15/bin/postgres", "--version"),
    "wal2json": command("dpkg-query", "-W", "-f=${Version}", "postgresql-15-wal2json"),
    "rustc": command("rustc", "--version"),
    "settings": "shared_buffers=1GB, max_wal_size=4GB, wal_level=logical, pg_sync preloaded; "
                "release builds; the load generator is a separate process on the same cores",
    "seconds_per_run": seconds,
}
goals = []


def goal(name, met, detail):
    goals.append({"goal": name, "met": met, "measured": detail})


lines = ["# pg_sync benchmark report", ""]
lines += [f"Machine: {machine['cores']} cores, {machine['memory_gib']} GiB, {machine['platform']}. "
          f"{machine['postgresql']}; wal2json {machine['wal2json']}; {machine['rustc']}. "
          f"Settings: {machine['settings']}. Runs of {seconds} s. Every ratio compares two "
          "figures of this same run.", ""]
lines += ["| figure | pg_sync | reference (same run) | ratio |", "| --- | --- | --- | --- |"]

for durability in ("on", "off"):
    for clients in ("2", "8"):
        key = lambda v: tps.get((v, durability, clients))  # noqa: E731
        p, t, a = key("plain"), key("tracked"), key("audit")
        if not (p and t and a):
            continue
        label = "durable" if durability == "on" else "synchronous_commit=off"
        lines.append(f"| trigger capture, single-row UPDATE TPS, {label}, {clients} clients | {t:.0f} | "
                     f"untracked {p:.0f}; PL/pgSQL audit trigger {a:.0f} | {t / p:.2f}× untracked, {t / a:.2f}× audit |")
        if durability == "on":
            goal(f"trigger ≥ 0.85× untracked, durable, {clients} clients", t / p >= 0.85, f"{t / p:.2f}×")
if bulk:
    lines.append(f"| trigger capture, one UPDATE of all rows (s, best of 3) | {bulk['tracked']:.2f} s | "
                 f"untracked {bulk['plain']:.2f} s; audit trigger {bulk['audit']:.2f} s | "
                 f"{bulk['tracked'] / bulk['plain']:.2f}× the time |")

wal = run("wal_ingest")
if wal:
    ingest, raw = wal["changes"] / wal["ingest_seconds"], wal["changes"] / wal["raw_decode_seconds"]
    lines.append(f"| WAL ingest of a {wal['changes']:,}-change backlog (changes/s) | {ingest:,.0f} | "
                 f"wal2json decoding alone {raw:,.0f} | {ingest / raw:.2f}× |")

notify = run("notify")
latency = [r for r in runs if r["mode"] == "latency" and not r.get("via")]
for r in latency:
    ref = f"NOTIFY round trip p50 {notify['p50_ms']:.2f} ms, p99 {notify['p99_ms']:.2f} ms" if notify else "—"
    ratio = f"p99 {r['p99_ms'] / notify['p99_ms']:.1f}× NOTIFY's" if notify and r["p99_ms"] else "—"
    bare = run("bare_latency", connections=r["connections"])
    if bare and bare["p99_ms"]:
        ref += (f"; bare WebSocket server, same frames at the same rate to the same connections: "
                f"p50 {bare['p50_ms']:.1f}, p99 {bare['p99_ms']:.1f} ms")
        ratio += f", {r['p99_ms'] / bare['p99_ms']:.1f}× the bare server's"
        if r["connections"] == 10000:
            goal("p99 ≤ 1.5× a bare WebSocket server's at 10,000 connections", r["p99_ms"] <= 1.5 * bare["p99_ms"],
                 f"{r['p99_ms'] / bare['p99_ms']:.1f}×")
    lines.append(f"| commit → client latency, {r['connections']:,} connections, {r['rate']} commits/s "
                 f"({r['samples']:,} deliveries) | p50 {r['p50_ms']:.1f}, p90 {r['p90_ms']:.1f}, "
                 f"p99 {r['p99_ms']:.1f}, max {r['max_ms']:.1f} ms | {ref} | {ratio} |")
    share = run("gateway_share", connections=r["connections"])
    if share:
        bound = lambda v: "—" if v is None else f"≤ {v:g}"
        lines.append(f"| … where the time goes (the gateway's histograms, same run; bucket bounds) | "
                     f"capture → routed p50 {bound(share['routing_p50_ms'])}, p99 {bound(share['routing_p99_ms'])} ms, "
                     f"of which page read → routed p50 {bound(share.get('read_to_routed_p50_ms'))}, "
                     f"p99 {bound(share.get('read_to_routed_p99_ms'))} ms (the rest: commit, wake-up, read); "
                     f"queued → written p50 {bound(share['send_wait_p50_ms'])}, p99 {bound(share['send_wait_p99_ms'])} ms | — | — |")
    if r["connections"] == 1000:
        goal("p99 ≤ 25 ms at 1,000 connections and 1,000 commits/s", r["p99_ms"] <= 25, f"{r['p99_ms']:.1f} ms")
    if r["connections"] == 10000:
        goal("p99 ≤ 100 ms at 10,000 connections and 1,000 commits/s", r["p99_ms"] <= 100, f"{r['p99_ms']:.1f} ms")

def bare_fanout(one_change):
    """The bare server's fan-out run: of the gateway's frame size, or of one-change frames."""
    return next((r for r in runs if r["mode"] == "bare_fanout"
                 and (r["changes_per_s"] <= r["messages_per_s"] * 1.01) == one_change), None)


fan, bare, bare_one = run("fanout", rls_claim_sets=0, backlog=None), bare_fanout(False), bare_fanout(True)
if fan:
    ref = (f"bare WebSocket server, same frames: {bare['messages_per_s']:,.0f} msgs/s "
           f"({bare['changes_per_s']:,.0f} changes/s)") if bare else "—"
    ratio = f"{fan['messages_per_s'] / bare['messages_per_s']:.2f}×" if bare else "—"
    lines.append(f"| fan-out to {fan['connections']:,} whole-table subscribers, no RLS | "
                 f"{fan['messages_per_s']:,.0f} msgs/s ({fan['changes_per_s']:,.0f} changes/s) | {ref} | {ratio} |")
    goal("fan-out ≥ 300k msgs/s without RLS (changes delivered/s; messages batch changes)",
         fan["changes_per_s"] >= 300_000, f"{fan['changes_per_s']:,.0f} changes/s in {fan['messages_per_s']:,.0f} messages/s")


def backlog_run(r):
    """What a `fanout --backlog` run delivered: changes/s, and how many of how many."""
    return (f"{r['changes_per_s']:,.0f} changes/s ({r['changes_delivered']:,} of "
            f"{r['deliveries_expected']:,} deliveries in {r['seconds']:.2f} s)")


fan_backlog = run("fanout", rls_claim_sets=0, filter_sets=0, backlog=True)
if fan_backlog:
    lines.append(f"| fan-out of a backlog (written while the gateway was paused, read at full speed once it "
                 f"resumed): {fan_backlog['changes_written']:,} changes in transactions of "
                 f"{fan_backlog['rows_per_commit']:,} rows to {fan_backlog['connections']:,} subscribers, no RLS | "
                 f"{backlog_run(fan_backlog)} | — | — |")
log_read = run("catchup")
for r in [r for r in runs if r["mode"] == "fanout" and r.get("rls_claim_sets") and r.get("backlog")
          and not r.get("rls_one_team")]:
    sets, subquery = r["rls_claim_sets"], r.get("rls_policy") == "subquery"
    policy = "a membership policy (`IN (SELECT …)`, compiled: membership rows read per page)" if subquery \
        else "a claim-comparing policy (compiled)"
    refs = [f"no RLS, live, above: {fan['changes_per_s']:,.0f} changes/s"] if fan else []
    if fan_backlog:
        refs.append(f"no RLS, the same backlog to {fan_backlog['connections']:,}: "
                    f"{fan_backlog['changes_per_s']:,.0f} changes/s")
    ratios = [f"{r['changes_per_s'] / x['changes_per_s']:.3f}× {name}"
              for x, name in ((fan, "live"), (fan_backlog, "backlog")) if x]
    # The same deliveries without RLS: each subscriber filtering on its team.
    filtered = run("fanout", rls_claim_sets=0, filter_sets=sets, connections=r["connections"], backlog=True)
    if filtered:
        refs.append(f"no RLS, the same deliveries (each subscriber a filter on its team): "
                    f"{filtered['changes_per_s']:,.0f} changes/s")
        ratios.append(f"{r['changes_per_s'] / filtered['changes_per_s']:.2f}× the same deliveries")
    if bare_one and sets == r["connections"]:
        refs.append(f"bare WebSocket server, one-change frames to {bare_one['connections']:,} connections: "
                    f"{bare_one['messages_per_s']:,.0f} msgs/s")
        ratios.append(f"{r['changes_per_s'] / bare_one['messages_per_s']:.2f}× the bare server's")
    # One subscriber per claim set: each change of the log is delivered once, so the log's
    # own read rate (sync.changes_since alone, the catch-up run) bounds the row, where the
    # no-RLS rows deliver each change read to every subscriber.
    if log_read and sets == r["connections"]:
        read_rate = log_read["changes"] / log_read["changes_since_seconds"]
        refs.append(f"the log read alone (`sync.changes_since`, the catch-up run): {read_rate:,.0f} changes/s")
        ratios.append(f"{r['changes_per_s'] / read_rate:.2f}× the log read alone")
    lines.append(f"| fan-out with RLS of a backlog of {r['changes_written']:,} changes, {r['connections']:,} "
                 f"subscribers in {sets:,} claim sets, {policy} | {backlog_run(r)} | {'; '.join(refs) or '—'} | "
                 f"{', '.join(ratios) or '—'} |")
    if not subquery and sets in (10, 1000):
        need = 100_000 if sets == 10 else 50_000
        goal(f"fan-out ≥ {need // 1000}k changes/s with RLS in {sets:,} claim sets (compiled policy)",
             r["changes_per_s"] >= need, f"{r['changes_per_s']:,.0f} changes/s")

for r in [r for r in runs if r["mode"] == "fanout" and r.get("rls_claim_sets") and r.get("backlog")
          and r.get("rls_one_team")]:
    # Every subscriber sees every change, through a claim set of its own: beside the same
    # backlog to the same subscribers without RLS, the cost of judging the policy.
    sets, kind = r["rls_claim_sets"], "membership" if r.get("rls_policy") == "subquery" else "claim-comparing"
    policy = "a membership policy (`IN (SELECT …)`, compiled), every user a member of the one team" \
        if kind == "membership" else "a claim-comparing policy (`claims -> 'teams' ? team`, compiled), every " \
        "user's `teams` naming the one team beside one of its own"
    same = run("fanout", rls_claim_sets=0, filter_sets=0, backlog=True, connections=r["connections"],
               changes_written=r["changes_written"])
    ref = f"no RLS, the same backlog to the same subscribers: {backlog_run(same)}" if same else "—"
    ratio = f"{r['changes_per_s'] / same['changes_per_s']:.2f}×" if same else "—"
    lines.append(f"| fan-out with RLS of a backlog of {r['changes_written']:,} changes, {r['connections']:,} "
                 f"subscribers in {sets:,} claim sets, each change seen by all of them: {policy} | "
                 f"{backlog_run(r)} | {ref} | {ratio} |")
    if same:
        goal(f"fan-out with RLS in {sets:,} claim sets, {kind} policy, ≥ 0.5× no RLS (changes delivered/s, "
             "every subscriber seeing every change, beside the same fan-out without RLS)",
             r["changes_per_s"] >= same["changes_per_s"] / 2, ratio)

enter = run("enter")
if enter:
    lines.append(f"| a user joins a project of {enter['rows']:,} tasks (compiled membership policy): membership "
                 f"commit → RESYNC → refetched copy holds them, {enter['rounds']} rounds | "
                 f"p50 {enter['enter']['p50_ms']:.1f}, p99 {enter['enter']['p99_ms']:.1f} ms "
                 f"(leaving: p50 {enter['leave']['p50_ms']:.1f}, p99 {enter['leave']['p99_ms']:.1f} ms; "
                 f"the membership's own commit p50 {enter['commit']['p50_ms']:.1f}, "
                 f"p99 {enter['commit']['p99_ms']:.1f} ms"
                 + (f"; {enter['bystanders']:,} other users following the tasks got "
                    f"{enter['bystander_resyncs']:,} RESYNCs in {2 * enter['rounds']} membership writes"
                    if "bystanders" in enter else "")
                 + (f"; commit → RESYNC received p50 {enter['resync']['p50_ms']:.1f}, "
                    f"p99 {enter['resync']['p99_ms']:.1f} ms" if "resync" in enter else "")
                 + ") | "
                 f"the same refetch alone: p50 {enter['snapshot']['p50_ms']:.1f}, "
                 f"p99 {enter['snapshot']['p99_ms']:.1f} ms | "
                 f"{enter['enter']['p99_ms'] / enter['snapshot']['p99_ms']:.2f}× at p99 |")

idle = run("idle")
if idle:
    lines.append(f"| resident memory per idle connection ({idle['connections']:,}, one subscription each) | "
                 f"{idle['kib_per_connection']} KiB | — | — |")
    goal("≤ 16 KiB per idle connection", idle["kib_per_connection"] <= 16, f"{idle['kib_per_connection']} KiB")

catchup = run("catchup")
if catchup:
    lines.append(f"| catch-up: {catchup['changes']:,} missed changes to one client (until SYNCED) | "
                 f"{catchup['gateway_seconds']:.2f} s | sync.changes_since read alone "
                 f"{catchup['changes_since_seconds']:.2f} s | "
                 f"{catchup['gateway_seconds'] / catchup['changes_since_seconds']:.2f}× the time |")
    goal(f"catch-up of {catchup['changes']:,} changes ≤ 10 s", catchup["gateway_seconds"] <= 10,
         f"{catchup['gateway_seconds']:.2f} s")

snap, copy = run("snapshot"), run("copy")
if snap:
    copy_rate = copy["rows"] / copy["seconds"] if copy else None
    ref = f"COPY … TO STDOUT {copy_rate:,.0f} rows/s" if copy else "—"
    ratio = f"{snap['rows_per_s'] / copy_rate:.2f}×" if copy else "—"
    lines.append(f"| snapshot streaming of {snap['rows']:,} rows (NDJSON, {snap['megabytes']} MB) | "
                 f"{snap['rows_per_s']:,.0f} rows/s, gateway peak RSS {snap['gateway_peak_rss_kib'] // 1024} MiB | "
                 f"{ref} | {ratio} |")

cold = {r["shared_snapshots"]: r for r in runs if r["mode"] == "cold_start"}
if True in cold and False in cold:
    shared, alone = cold[True], cold[False]
    lines.append(f"| cold start: {shared['clients']:,} clients of one audience fetch the snapshot of a table of "
                 f"{shared['rows']:,} rows at once (retrying after `Retry-After` at the snapshot caps), "
                 f"the gateway sharing snapshots (`--snapshot-share-for 10s`) | "
                 f"{shared['seconds']:.2f} s, {shared['snapshot_reads']} snapshots read, {shared['refused']:,} refusals | "
                 f"a gateway reading one for each: {alone['seconds']:.2f} s, {alone['snapshot_reads']} read, "
                 f"{alone['refused']:,} refusals | {shared['snapshot_reads'] / max(alone['snapshot_reads'], 1):.3f}× the reads, "
                 f"{shared['seconds'] / alone['seconds']:.2f}× the time |")

for mode, what in (("catchup", "catch-up of {changes:,} changes"), ("snapshot", "snapshot of {rows:,} rows")):
    p, s = run(mode, via="primary"), run(mode, via="standby")
    if not (p and s):
        continue
    took = lambda r: r["gateway_seconds"] if mode == "catchup" else r["seconds"]  # noqa: E731
    share = s["primary_cpu_seconds"] / max(p["primary_cpu_seconds"], 0.01)
    lines.append(f"| {what.format(**s)} served by a gateway reading a hot standby (`--read-url`): time, and "
                 f"the primary's CPU meanwhile | {took(s):.2f} s, primary CPU {s['primary_cpu_seconds']:.2f} s | "
                 f"the primary's own gateway: {took(p):.2f} s, primary CPU {p['primary_cpu_seconds']:.2f} s | "
                 f"{share:.2f}× the primary's CPU |")
    goal(f"{mode} through a standby costs the primary ≤ 5 % of serving it itself", share <= 0.05, f"{share * 100:.1f} %")
p, s = run("latency", via="primary"), run("latency", via="standby")
if p and s:
    lines.append(f"| commit → client latency through a standby's gateway, {s['connections']:,} connections, "
                 f"{s['rate']} commits/s | p50 {s['p50_ms']:.1f}, p99 {s['p99_ms']:.1f} ms | the primary's gateway: "
                 f"p50 {p['p50_ms']:.1f}, p99 {p['p99_ms']:.1f} ms | {s['p99_ms'] / p['p99_ms']:.2f}× p99 |")
    goal("commit → client p99 through a standby ≤ 1.5× the primary's", s["p99_ms"] <= 1.5 * p["p99_ms"],
         f"{s['p99_ms'] / p['p99_ms']:.2f}×")

pages = run("pages")
if pages:
    c, r = pages["cached"], pages["private"]
    lines.append(f"| catch-up of {pages['readers']:,} readers of one audience from one cursor, {pages['changes']:,} "
                 f"changes in pages of 1,000, through nginx (docs/nginx.conf) | {c['seconds']:.2f} s, {c['reads']} pages "
                 f"read from the log for {c['pages']:,} served | the same readers reading privately from the gateway: "
                 f"{r['seconds']:.2f} s, {r['reads']:,} pages read | {c['reads'] / max(r['reads'], 1):.4f}× the reads, "
                 f"{c['seconds'] / r['seconds']:.2f}× the time |")
    goal(f"{pages['readers']:,} readers from one cursor cause a handful of log reads", c["reads"] <= 20,
         f"{c['reads']} reads")

browser, size = run("browser"), run("client_size")
if browser:
    in_page = browser.get("hydration_in_page_rows_per_s")
    lines.append(f"| browser hydration: {browser['hydration_rows']:,} rows into IndexedDB in headless Chromium, "
                 f"until the first live query answers (rows stored from a Web Worker) | {browser['hydration_rows_per_s']:,.0f} rows/s "
                 f"({browser['hydration_seconds']:.2f} s), main thread's longest task "
                 f"{browser.get('hydration_longest_task_ms', float('nan')):.0f} ms | the same snapshot fetched and parsed alone "
                 f"{browser['fetch_parse_rows_per_s']:,.0f} rows/s"
                 + (f"; stored from the page {in_page:,.0f} rows/s, longest task {browser['hydration_in_page_longest_task_ms']:.0f} ms" if in_page else "")
                 + f"; published: RxDB ~12k rows/s (80 ms per 1,000 documents in one IndexedDB transaction), PowerSync desktop 27.6k rows/s | "
                 f"{browser['hydration_rows_per_s'] / browser['fetch_parse_rows_per_s']:.2f}× fetch and parse |")
    socket = browser.get("socket_p99_ms")
    lines.append(f"| browser commit → live-query callback, {browser['rate']:,} commits/s ({browser['samples']:,} "
                 f"callbacks) | p50 {browser['p50_ms']:.0f}, p99 {browser['p99_ms']:.0f}, max {browser['max_ms']:.0f} ms | "
                 + (f"commit → the page's socket in the same run: p50 {browser['socket_p50_ms']:.0f}, p99 {socket:.0f} ms | "
                    f"the client adds {browser['p99_ms'] - socket:+.0f} ms at p99 |" if socket is not None else "commit → WebSocket client p99 above | — |"))
    if "follower_heap_mib" in browser:
        lines.append(f"| browser follower tab's heap holding {browser['hydration_rows']:,} task rows (a tab that opened no "
                     f"entity: {browser['idle_client_heap_mib']:.1f} MiB for the client) | {browser['follower_heap_mib']:.1f} MiB | — | — |")
    goal("browser hydration ≥ 150,000 rows/s", browser["hydration_rows_per_s"] >= 150_000,
         f"{browser['hydration_rows_per_s']:,.0f} rows/s")
    goal("browser commit → callback p99 ≤ 50 ms at 1,000 commits/s", browser["p99_ms"] <= 50, f"{browser['p99_ms']:.0f} ms")
    if socket is not None:
        goal("the browser client adds ≤ 10 ms at p99 (callback p99 − socket p99)", browser["p99_ms"] - socket <= 10,
             f"{browser['p99_ms'] - socket:+.0f} ms")
if size:
    kb = size["core_min_gzip_bytes"] / 1024
    lines.append(f"| client core bundle (with idb), min+gzip | {kb:.1f} kB | published: Electric client 18 kB, "
                 f"Supabase Realtime 17 kB, Replicache 36 kB | — |")
    goal("client core ≤ 15 kB min+gzip", kb <= 15, f"{kb:.1f} kB")

lines += ["", "## Goals", "", "| goal | measured | met |", "| --- | --- | --- |"]
lines += [f"| {g['goal']} | {g['measured']} | {'yes' if g['met'] else '**no**'} |" for g in goals]
lines += ["", "![commit → client latency](latency.svg)", "",
          "Raw data: `results.jsonl` (one line per run), `trigger.csv`, `bulk.csv`; everything in "
          "`results.json`. Produced by `make bench` (`make bench-quick` for a smoke run with small sizes)."]
open(os.path.join(out, "REPORT.md"), "w").write("\n".join(lines) + "\n")
json.dump({"machine": machine, "goals": goals, "runs": runs, "trigger_tps": [
    {"variant": v, "durability": d, "clients": c, "tps": x} for (v, d, c), x in tps.items()],
    "bulk_seconds": bulk}, open(os.path.join(out, "results.json"), "w"), indent=1)


def latency_svg():
    """Grouped bars of p50/p90/p99 per connection count, NOTIFY's p99 as a dashed line."""
    width, height, left, bottom, top = 640, 340, 60, 40, 30
    peak = max([r["p99_ms"] for r in latency] + [notify["p99_ms"] if notify else 0] + [1])
    scale = (height - bottom - top) / peak
    group = (width - left - 20) / max(len(latency), 1)
    colors = {"p50_ms": "#8ecae6", "p90_ms": "#219ebc", "p99_ms": "#023047"}
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" font-family="sans-serif" font-size="12">',
             f'<text x="{left}" y="18">commit → client latency (ms), {latency[0]["rate"] if latency else ""} commits/s</text>',
             f'<line x1="{left}" y1="{height - bottom}" x2="{width - 10}" y2="{height - bottom}" stroke="black"/>']
    for i, r in enumerate(latency):
        x0 = left + i * group + group * 0.15
        bar = group * 0.7 / 3
        for j, key in enumerate(colors):
            h = r[key] * scale
            x = x0 + j * bar
            parts.append(f'<rect x="{x:.1f}" y="{height - bottom - h:.1f}" width="{bar - 2:.1f}" height="{h:.1f}" fill="{colors[key]}"/>')
            parts.append(f'<text x="{x + bar / 2 - 1:.1f}" y="{height - bottom - h - 3:.1f}" text-anchor="middle" font-size="10">{r[key]:.1f}</text>')
        parts.append(f'<text x="{x0 + group * 0.35:.1f}" y="{height - bottom + 16}" text-anchor="middle">{r["connections"]:,} connections</text>')
    if notify:
        y = height - bottom - notify["p99_ms"] * scale
        parts.append(f'<line x1="{left}" y1="{y:.1f}" x2="{width - 10}" y2="{y:.1f}" stroke="#fb8500" stroke-dasharray="5,4"/>')
        parts.append(f'<text x="{width - 12}" y="{y - 4:.1f}" text-anchor="end" fill="#fb8500">NOTIFY round trip p99 {notify["p99_ms"]:.2f} ms</text>')
    for j, key in enumerate(colors):
        parts.append(f'<rect x="{left + j * 70}" y="{height - 14}" width="10" height="10" fill="{colors[key]}"/>'
                     f'<text x="{left + j * 70 + 14}" y="{height - 5}">{key[:3]}</text>')
    parts.append("</svg>")
    return "\n".join(parts) + "\n"


open(os.path.join(out, "latency.svg"), "w").write(latency_svg())
print(open(os.path.join(out, "REPORT.md")).read())
