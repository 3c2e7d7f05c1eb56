"""The run's blueprint: the example blueprint's server, storage and matching settings, the SALESFORCE source
(owning status and credit_limit, its secret read from the environment), and `[events]` from the options (the
applier's ceiling, floor and the serving CPU between them: the server's defaults unless given)."""

from __future__ import annotations

import argparse
import textwrap

from bench.events.crm import SECRET_ENV


def blueprint(a: argparse.Namespace) -> str:
    """Server, storage and matching as in examples/blueprint.toml; SALESFORCE owns status and credit_limit."""
    return textwrap.dedent(f"""\
        version = 1
        name = "events drain bench"
        [server]
        workers = 2
        threads = 16
        max_concurrent_rpcs = 256
        grace_period_s = 5
        [storage]
        map_size_mb = 4096
        max_readers = 1024
        sweep_interval_s = 60
        [index]
        hash = "xxh3-128"
        [matching]
        write_keys = ["external_id", "email"]
        default_region = "US"
        phone_acceptance = "valid"
        max_fanout = 25
        max_candidates = 10
        blocked_values = ["+18005550100", "unknown@acme.example"]
        [attributes.name]
        type = "string"
        max_length = 200
        [attributes.status]
        type = "string"
        enum = ["Active", "Churned", "Prospect", "Suspended"]
        owner = "SALESFORCE"
        [attributes.tier]
        type = "string"
        enum = ["bronze", "silver", "gold", "platinum"]
        [attributes.credit_limit]
        type = "number"
        minimum = 0
        owner = "SALESFORCE"
        [attributes.preferred_language]
        type = "string"
        pattern = "^[a-z]{{2}}(-[A-Z]{{2}})?$"
        [views.default]
        fields = ["name", "status", "tier", "preferred_language"]
        [reliability]
        peak_rps = 2000
        latency_target_ms = 1.0
        idempotency_retention_s = 86400
        [logging]
        payload = "masked"
        level = "INFO"
        [sources.SALESFORCE]
        field_map = {{ Customer_Status__c = "status", Credit_Limit__c = "credit_limit" }}
        secrets = [{{ env = "{SECRET_ENV}" }}]
        [events]
        http_listen = "127.0.0.1:0"
        rate_per_s = {a.drain_rate:g}
        min_rate_per_s = {a.min_drain_rate:g}
        idle_cpu = {a.idle_cpu:g}
        busy_cpu = {a.busy_cpu:g}
        batch = {a.batch}
        high_water = {a.high_water}
        timestamp_tolerance_s = 300
        process_nice = {a.events_nice}
        process_sched_idle = {"true" if a.events_sched_idle else "false"}
        commit_window_ms = {a.commit_window_ms:g}
        """)
