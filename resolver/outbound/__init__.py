"""Outbound delivery to the CRM (contract §5b): a transactional outbox and a deliverer of signed webhooks.

- `messages`: what a change-log entry becomes for one destination (`[outbound.NAME]`): event type, data, body.
- `outbox`: the outbox in LMDB (`ob_queue`, `ob_dlq`, `ob_state`): the change listener that queues messages in the
  change's own transaction, and every move of a message (acknowledged, retried, dead, replayed, discarded, erased),
  each with its conservation counters in the same transaction.
- `policy`: how an answer is judged (2xx, 429 + Retry-After, 5xx / resets / timeouts, other 4xx) and the back-off.
- `deliverer`: the asyncio engine: in order per customer, parallel across customers, rate-limited per destination.
- `process`: the deliverer's own process under `resolver serve`; `admin` and `cli`: the operators' side.
"""
