"""Past one machine (contract §10): every write goes through one replicated, totally ordered log.

    handler -> prepare (clock, uuids fixed) -> ReplicatedWriter.submit -> codec -> JetStream stream (R3, Raft)
    every node: Applier -> apply(command) in one LMDB transaction with the stream sequence -> Outcomes
    the writing node's handler <- the outcome of its own command (read-your-writes), with its sequence
    a read on any node with min_sequence = that sequence -> ReadGate: waits until applied here, refuses stale data

Modules: codec (command <-> bytes, apply by name), log (the NATS connection and the stream), applier (one per
data directory), outcomes (what each recent sequence returned), horizon (how far the stream goes, as last seen),
reads (ReadGate: which reads this node may answer), written (a call's write sequence, for its answer), writer
(ReplicatedWriter), lease (which node delivers outbound messages and publishes retention), retention (change-log
retention as a command), retention_publisher (the lease holder publishing it), local (a loopback NATS cluster for
tests and `make cluster`). Change events and outbound decisions are commands too (resolver.events.command,
resolver.outbound.settle, resolver.outbound.admin).
"""
