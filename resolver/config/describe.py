"""`resolver blueprint check`'s summary of the settings."""

from __future__ import annotations

from resolver.config.schema import DEFAULT_VIEW, PRECEDENCE
from resolver.config.settings import Settings
from resolver.config.tables import EventSettings


def describe(s: Settings) -> str:
    """A readable summary of the settings, for `resolver blueprint check` (secrets never shown)."""
    server, storage, index, matching = s.server, s.storage, s.index, s.matching
    lines = [
        f"blueprint: {s.blueprint_path or '(none: built-in defaults)'}",
        f"server: listen {server.listen}, {server.workers} worker(s) x {server.threads} threads (own ports "
        f"{f'from {server.worker_port_base}' if server.worker_port_base else 'chosen at start'}), "
        f"max {server.max_concurrent_rpcs} concurrent RPCs, calls refused once one waited "
        f"{server.max_queue_wait_ms:g} ms for a thread, past {server.threads + server.max_queued_calls} calls in a "
        f"worker the rest wait in gRPC (at most {server.max_backlog_calls} calls and {server.max_backlog_s} s; "
        f"{server.refusal_share:g} refusal per answer), grace {server.grace_period_s:g}s (NOT_SERVING notice "
        f"{min(server.shutdown_notice_s, server.grace_period_s / 2):g}s of it)",
        f"storage: {server.data_dir} (map size {storage.map_size_mb} MiB, {storage.max_readers} readers)",
        f"index keys: {index.hash}" + (f" (key id {index.key_id}, secret set)" if index.secret else ""),
        f"matching: {' > '.join(PRECEDENCE)}; writes select by {', '.join(matching.write_keys) or 'nothing'}; "
        f"phones must be {matching.phone_acceptance}; default region {matching.default_region or '(none)'}; "
        f"fan-out limit {matching.max_fanout}; up to {matching.max_candidates} candidates",
        f"blocked: {len(matching.blocked_values)} value(s), {len(matching.blocked_patterns)} pattern(s) beyond the built-ins",
    ]
    if s.attributes:
        lines.append(f"attributes ({len(s.attributes)}):")
        for spec in s.attributes.values():
            extras = [f"owner {spec.owner}"] if spec.owner else []
            extras += ["sensitive"] if spec.sensitive else []
            lines.append(f"  {spec.name}: {spec.type}" + (f" ({', '.join(extras)})" if extras else ""))
    else:
        lines.append("attributes: open schema (no attributes declared)")
    views = dict(s.views) or {DEFAULT_VIEW: ("(all attributes)",)}
    lines.append("views: " + "; ".join(f"{k} = {', '.join(v)}" for k, v in views.items()))
    rel = s.reliability
    lines.append(
        f"reliability: peak {rel.peak_rps:g} Resolve/s, p99 target {rel.latency_target_ms:g} ms, "
        f"idempotency retention {rel.idempotency_retention_s:g}s"
    )
    lines.append(f"logging: payload {s.logging.payload}, level {s.logging.level}")
    lim = s.limits
    lines.append(
        f"limits: message {lim.message_bytes} B, metadata {lim.metadata_bytes} B, identifiers "
        f"{lim.identifiers_per_request}/request and {lim.identifiers_per_customer}/customer, attributes "
        f"{lim.attributes_per_request}/request, lists {lim.items_per_list}, strings {lim.string_chars} chars, "
        f"depth {lim.struct_depth}"
    )
    for src in sorted(s.sources.values(), key=lambda x: x.name):
        missing = (f"; UNRESOLVED: {', '.join(src.unresolved)} (`serve` refuses to start; with [server] insecure its "
                   "webhooks are refused)") if src.unresolved else ""
        ids = ", ".join(f"{crm} -> {kind}" for crm, kind in sorted(src.identifiers.items())) or "none"
        region = f", region {src.default_region}" if src.default_region else ""
        lines.append(f"source {src.name}: {len(src.field_map)} mapped field(s), identifiers {ids}{region}, "
                     f"{len(src.secrets)} secret(s){missing}")
    for dest in sorted(s.outbound.values(), key=lambda x: x.name):
        missing = (f"; UNRESOLVED: {', '.join(dest.unresolved)} (`serve` refuses to start; with [server] insecure "
                   "nothing is sent)") if dest.unresolved else ""
        lines.append(f"outbound {dest.name}: {dest.url}; {', '.join(dest.events)}; fields "
                     f"{', '.join(dest.fields) or '(all but sensitive)'}; not echoing {dest.source_system or '-'}; "
                     f"{f'{dest.rate_per_s:g}/s' if dest.rate_per_s else 'no rate limit'}, {dest.concurrency} in "
                     f"flight, timeout {dest.timeout_s:g}s, back-off {dest.backoff_initial_s:g}-{dest.backoff_max_s:g}s, "
                     f"dead after {dest.max_age_s:g}s; {len(dest.secrets)} secret(s){missing}")
    ev = s.events
    lines.append(
        f"events: {'on' if ev.enabled else 'off'}; http {ev.http_listen or '(none)'}; {_pace(ev)} "
        f"in batches of {ev.batch}; inbox high-water {ev.high_water}; timestamp tolerance {ev.timestamp_tolerance_s:g}s; "
        f"an event before its record's CREATE waits {ev.unknown_record_wait_s:g}s; commit window {ev.commit_window_ms:g} ms; "
        f"events process nice +{ev.process_nice}{' (SCHED_IDLE)' if ev.process_sched_idle else ''}"
    )
    it = s.interactions
    tracked = it.last_interaction_attribute or "(no attribute: last interaction not tracked)"
    lines.append(f"interactions: {it.history} kept per customer; last interaction -> {tracked}; unmatched ones "
                 f"{'create a customer' if it.create_customer else 'recorded unassociated'}")
    act = s.activity
    lines.append(f"activity: {act.record_type} \"{act.subject}\", owner from {len(act.owners)} agent(s), default "
                 f"{act.default_owner}" if act is not None else "activity: none (interactions carry no CRM activity)")
    ch = s.changes
    kept = ([f"{ch.retention_days:g} days"] if ch.retention_days else []) + \
        ([f"{ch.retention_count} entries"] if ch.retention_count else [])
    lines.append(f"changes: log kept {' or '.join(kept) + ' (whichever removes more)' if kept else 'whole'}; "
                 f"{ch.max_watchers} watcher(s) per worker, cut off after {ch.stall_timeout_s:g}s without reading")
    cl = s.cluster
    lines.append(f"cluster: writes through JetStream stream {cl.stream} (R{cl.replicas}, kept {cl.stream_max_age_s:g}s / "
                 f"{cl.stream_max_mb} MB) on {', '.join(cl.nats)}" if cl.nats else "cluster: off (writes applied here)")
    lines.append(f"metrics: GET /metrics on {s.metrics.listen}" if s.metrics.listen else "metrics: off")
    return "\n".join(lines)


def _pace(ev: EventSettings) -> str:
    """The applier's pace in words: adaptive between a floor and a ceiling, or fixed."""
    low = min(ev.min_rate_per_s, ev.rate_per_s)
    if low == ev.rate_per_s:
        return f"apply {ev.rate_per_s:g}/s (fixed: min_rate_per_s is not below rate_per_s)"
    return (f"apply {low:g}-{ev.rate_per_s:g}/s ({ev.rate_per_s:g}/s while the serving processes use at most "
            f"{100 * ev.idle_cpu:g}% of the CPU, {low:g}/s from {100 * ev.busy_cpu:g}%)")
