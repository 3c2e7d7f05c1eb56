"""CRM change events (contract §5, §6): signed webhooks and gRPC ingestion into a durable inbox, an applier
with per-field last-writer-wins, a dead-letter queue and conservation counters.

    http.py (aiohttp) | IngestEvents  ->  inbox.Ingestor.admit   signatures, format.interpret, dedupe, inbox
    applier.Applier (one per data dir) ->  apply.apply_event      per-field LWW, conflicts, ownership, tombstones
    dlq.py, cli.py, runtime.Events     ->  list / show (masked) / replay / discard; counters.py: conservation

envelope.py is the stored form of an event (metadata + the original bytes); runtime.py wires it all to a server.
"""
