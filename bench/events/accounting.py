"""What the run proves, from its raw material: the drain's figures from the counter samples (and the pace the
applier logged), the customers' values after it, the change log and DLQ against what the pusher was told, and
the verdicts."""

from __future__ import annotations

import re
from collections import Counter
from pathlib import Path
from typing import Any

from bench.events.crm import event_of, webhook_prefix


def drain_figures(rows: list[list[float]], push: dict[str, Any], dur_b: float, drained_at: float,
                  configured_rate: float) -> dict[str, Any]:
    """The drain as the counter samples (`Sampler` rows, s after the release) and the pusher saw it: when the
    inbox emptied, the applier's rate overall and during window B, and whether events flowed through all of B."""
    good = [r for r in rows if r[1] >= 0]
    in_window = [r for r in good if r[0] <= dur_b]
    busy = [r for r in good if r[2] > 0]
    first_apply = busy[0][0] if busy else None
    empty = next((r for r in good if r[0] > 0.5 and r[5] == 0 and r[1] >= len(push["accepted"])), None)
    applied_total = good[-1][2] + good[-1][3] if good else 0
    rate = None
    if first_apply is not None and empty is not None and empty[0] > first_apply:
        rate = round(applied_total / (empty[0] - first_apply), 1)  # samples every 0.5 s: a few % either way
    win_rate = None
    if len(in_window) >= 2:
        r0, r1 = in_window[0], in_window[-1]
        win_rate = round(((r1[2] + r1[3]) - (r0[2] + r0[3])) / max(r1[0] - r0[0], 1e-9), 1)
    return {"samples": good, "columns": ["t_s", "accepted", "applied", "dead_lettered", "throttled", "in_inbox"],
            "window_b_s": dur_b, "drained": empty is not None, "inbox_empty_after_s": empty[0] if empty else None,
            "waited_s": round(drained_at, 1),
            "inbox_nonempty_through_window_b": bool(in_window) and all(r[5] > 0 for r in in_window if r[0] >= 1.0),
            # the inbox not yet drained when window B ended, and through B either never empty (back-pressure) or fed
            # in every second (admissions slower than the applier)
            "events_flowing_through_window_b": (empty is not None and empty[0] >= dur_b and bool(in_window)
                                                and (all(r[5] > 0 for r in in_window if r[0] >= 1.0)
                                                     or all(n > 0 for n in push["accepted_per_s"][:int(dur_b)]))),
            "admissions_in_window_b_per_s": round(sum(push["accepted_per_s"][:int(dur_b)]) / max(int(dur_b), 1), 1),
            "inbox_max": max((r[5] for r in good), default=0),
            "inbox_min_in_window_b": min((r[5] for r in in_window if r[0] >= 1.0), default=None),
            "inbox_max_in_window_b": max((r[5] for r in in_window), default=None),
            "drain_rate_per_s": rate, "drain_rate_in_window_b_per_s": win_rate, "configured_rate_per_s": configured_rate,
            "admissions_per_s": (round(len(push["accepted"]) / push["last_accept_s"], 1)
                                 if push.get("last_accept_s") else None),
            "burst_admissions_per_s": (round(push["accepted_before_first_429"] / push["first_429_s"], 1)
                                       if push.get("first_429_s") else None)}


PACE_LINE = re.compile(r"applier: (inbox empty: )?(\d+) events in ([\d.]+) s \((\d+)/s\); pace (\d+)-(\d+)/s")


def applier_pace(log_text: str) -> dict[str, Any]:
    """The pace the applier reported in a stretch of the server's log (its lines every 10 s while events flow, and
    when the inbox empties): the slowest and fastest pace it kept, and each line's events, seconds and rate."""
    lines = [{"inbox_empty": bool(m.group(1)), "events": int(m.group(2)), "seconds": float(m.group(3)),
              "per_s": int(m.group(4)), "pace_low": int(m.group(5)), "pace_high": int(m.group(6))}
             for m in PACE_LINE.finditer(log_text)]
    return {"lines": lines, "pace_low": min((x["pace_low"] for x in lines), default=None),
            "pace_high": max((x["pace_high"] for x in lines), default=None)}


def idle_drain_figures(rows: list[list[float]], push: dict[str, Any], drained_at: float) -> dict[str, Any]:
    """Window D or E (no Resolve load) from its counter samples (counted from the release): how many events left
    the inbox and how fast, from the release until the inbox was seen empty (the sender's ramp-up included)."""
    good = [r for r in rows if r[1] >= 0]
    empty = next((r for r in good if r[5] == 0 and r[1] >= len(push["accepted"])), None)
    drained = good[-1][2] + good[-1][3] if good else 0
    return {"samples": good, "columns": ["t_s", "accepted", "applied", "dead_lettered", "throttled", "in_inbox"],
            "events": push["events"], "applied": drained, "drained": empty is not None,
            "inbox_empty_after_s": empty[0] if empty else None, "waited_s": round(drained_at, 1),
            "drain_rate_per_s": round(drained / empty[0], 1) if empty and empty[0] > 0 else None,
            "admissions_per_s": (round(len(push["accepted"]) / push["last_accept_s"], 1) if push.get("last_accept_s")
                                 else round(len(push["accepted"]) / push["elapsed_s"], 1) if push.get("elapsed_s")
                                 else None),
            "inbox_max": max((r[5] for r in good), default=0), "throttled_429": push["codes"].get("429", 0)}


def merge_pushes(*pushes: dict[str, Any]) -> dict[str, Any]:
    """What the pusher saw over several pushes of one run (distinct event numbers), for the ledger."""
    return {"events": sum(p["events"] for p in pushes), "accepted": sorted(j for p in pushes for j in p["accepted"]),
            "gave_up": {k: v for p in pushes for k, v in p["gave_up"].items()}}


def check_visible(stub: Any, pb: Any, accepted: list[int], customers: int, n: int = 500) -> dict[str, Any]:
    """Resolve up to `n` updated customers: each must show its newest accepted event's status and credit_limit."""
    newest: dict[str, int] = {}
    for j in accepted:
        ext = event_of(j, customers).external_id
        newest[ext] = max(j, newest.get(ext, -1))
    exts = sorted(newest)
    picked = exts[:: max(1, len(exts) // n)][:n]
    wrong: list[str] = []
    for ext in picked:
        ev = event_of(newest[ext], customers)
        status, credit = ev.status, ev.credit_limit
        r = stub.Resolve(pb.ResolveRequest(identifiers=pb.Identifiers(external_id=ext), fields=["status", "credit_limit"]),
                         timeout=5)
        got = dict(r.attributes)
        if r.outcome != pb.OUTCOME_MATCHED or got.get("status") != status or got.get("credit_limit") != credit:
            wrong.append(f"{ext}: expected {status}/{credit}, got {pb.Outcome.Name(r.outcome)} {got}")
    return {"checked": len(picked), "wrong": len(wrong), "examples": wrong[:5]}


def reconcile(config: Path, data: Path, run_id: str, push: dict[str, Any]) -> dict[str, Any]:
    """Read the change log and the DLQ (server stopped): every event the pusher had acknowledged 202 must be in
    exactly one of them exactly once; no other event of this run may be there."""
    from resolver.bootstrap import open_store
    from resolver.config import load_settings
    from resolver.events import dlq

    prefix = webhook_prefix(run_id)
    store = open_store(load_settings(config, data_dir=str(data)), readonly=True)
    applied: Counter[int] = Counter()
    dead: dict[int, str] = {}
    try:
        with store.read() as view:
            for ch in view.iter_changes():
                wid = ch.get("event", {}).get("webhook_id", "")
                if wid.startswith(prefix):
                    applied[int(wid[len(prefix):])] += 1
            if "ev_dlq" in store.db:
                for meta, _ in dlq.iterate(view.txn, store.db["ev_dlq"], ring=store.sealer.ring):
                    wid = meta.get("webhook_id", "")
                    if wid.startswith(prefix):
                        dead[int(wid[len(prefix):])] = str(meta.get("reason", "?"))
    finally:
        store.close()
    acked = set(push["accepted"])
    gave_up = {int(k) for k in push["gave_up"]}
    seen = set(applied) | set(dead)
    return {"acknowledged_202": len(acked), "applied_once": sum(1 for j in acked if applied[j] == 1 and j not in dead),
            "dead_lettered": len(dead), "dead_letter_reasons": dict(Counter(dead.values())),
            "applied_twice_or_more": sum(1 for c in applied.values() if c > 1),
            "acknowledged_but_missing": sorted(acked - seen)[:20], "missing_count": len(acked - seen),
            "stored_but_not_acknowledged": sorted(seen - acked)[:20], "unacknowledged_stored_count": len(seen - acked),
            "given_up": len(gave_up), "accounted": len(acked) + len(gave_up), "pushed": push["events"],
            "neither_acknowledged_nor_given_up": push["events"] - len(acked | gave_up)}


OLD_FIXED_RATE = 100.0  # the applier's fixed pace before it adapted (issue 14)
IDLE_DRAIN_TARGET = 10 * OLD_FIXED_RATE  # events/s with no Resolve load


def verdicts(r: dict[str, Any]) -> dict[str, Any]:
    """The run's answers: the p99 ratio against the 1.3x target, no event lost, conservation, the 429s, the drain
    rate under load and without it (against 10x the old fixed 100/s)."""
    a, b = r["window_a"]["latency_ms"], r["window_b"]["latency_ms"]
    c = r.get("window_c", {}).get("latency_ms")
    led, cnt = r["ledger"], r["counters"]["counters"]
    ratio = b["p99"] / a["p99"] if a["p99"] else None
    no_loss = (led["missing_count"] == 0 and led["applied_twice_or_more"] == 0 and led["neither_acknowledged_nor_given_up"] == 0
               and led["unacknowledged_stored_count"] == 0 and cnt["accepted"] == led["acknowledged_202"]
               and r["visible"]["wrong"] == 0)
    pushed = r.get("window_d", {}).get("drain_rate_per_s")
    idle = r.get("window_e", {}).get("drain_rate_per_s", pushed)  # the applier's own rate, where it was measured
    refused_in_a = sum(r["window_a"].get("errors", {}).values())
    return {"p99_ratio_b_over_a": None if ratio is None else round(ratio, 3),
            # the baseline itself refused or lost calls: the server was past its knee with no event at all, so the
            # ratio says how this machine queues, not what the drain costs (bench/README.md, the events bench)
            "baseline_refused": refused_in_a, "baseline_overloaded": refused_in_a > 0,
            "p99_ratio_b_over_c": round(b["p99"] / c["p99"], 3) if c and c["p99"] else None,
            "p99_target_holds": ratio is not None and ratio <= 1.3,
            "drain_rate_under_load_per_s": r["drain"]["drain_rate_in_window_b_per_s"],
            "drain_rate_idle_per_s": idle, "drain_rate_idle_push_per_s": pushed,
            "idle_drain_target_holds": None if idle is None else idle >= IDLE_DRAIN_TARGET,
            "conserved": bool(r["counters"]["conserved"]) and r["check"]["exit"] == 0,
            "no_event_lost": no_loss, "all_accepted": led["acknowledged_202"] == led["pushed"],
            "throttled_429": r["pusher"]["codes"].get("429", 0), "first_429_s": r["pusher"]["first_429_s"],
            "window_inside_drain": r["drain"]["events_flowing_through_window_b"]}
