"""The gateway's own share of a latency run, from its /metrics before and after the run:
percentiles of `sync_delivery_lag_seconds` (a change's capture to its routing: the
database's commit and wake-up, the read, and the gateway), `sync_route_lag_seconds` (its
page's read to its routing: the gateway) and `sync_send_wait_seconds` (a message's queueing
to its write to the socket: the gateway), as the upper bounds of their histogram buckets.
Prints one JSON line.

Usage: gateway_share.py BEFORE AFTER CONNECTIONS"""
import json
import re
import sys


def buckets(path, name):
    """{upper bound: cumulative count} of one histogram in a Prometheus text exposition."""
    pattern = re.compile(rf'^sync_{name}_bucket\{{le="([^"]+)"\}} (\S+)$')
    out = {}
    for line in open(path):
        m = pattern.match(line.strip())
        if m:
            out[float(m.group(1))] = float(m.group(2))
    return out


def percentile_ms(before, after, q):
    """The smallest bucket bound under which a share q of the run's observations fall."""
    bounds = sorted(after)
    counts = [after[b] - before.get(b, 0) for b in bounds]
    total = counts[-1] if counts else 0
    if total == 0:
        return None
    for bound, count in zip(bounds, counts):
        if count >= q * total:
            return bound * 1000
    return None


before_path, after_path, connections = sys.argv[1], sys.argv[2], int(sys.argv[3])
record = {"mode": "gateway_share", "connections": connections}
for name, key in [("delivery_lag_seconds", "routing"), ("route_lag_seconds", "read_to_routed"),
                  ("send_wait_seconds", "send_wait")]:
    before, after = buckets(before_path, name), buckets(after_path, name)
    for q in (0.5, 0.99):
        record[f"{key}_p{round(q * 100)}_ms"] = percentile_ms(before, after, q)
print(json.dumps(record))
