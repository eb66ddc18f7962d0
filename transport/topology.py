"""Putting the topology on a broker: declaring what the coordinator owns, and moving a
message that cannot be processed to the dead letters."""

from __future__ import annotations

from contracts.topology import DEFAULT_AUDIT_RETENTION, HEADERS, Topology
from transport.port import Delivery, Transport

__all__ = ["dead_letter", "declare_topology"]


async def declare_topology(
    transport: Transport, topology: Topology, *, audit_retention: str = DEFAULT_AUDIT_RETENTION
) -> None:
    """Declare everything the coordinator owns (idempotent)."""
    for exchange in topology.exchange_specs():
        await transport.declare_exchange(exchange)
    for queue in topology.queue_specs(audit_retention=audit_retention):
        await transport.declare_queue(queue)


async def dead_letter(
    transport: Transport,
    topology: Topology,
    delivery: Delivery,
    *,
    reason: str,
    code: str,
    rejected_by: str,
    field: str | None = None,
) -> None:
    """Move a message that cannot be processed to the dead-letter queue with the reason
    in its headers, then ack it. Publishing first (confirmed) means a crash in between
    leaves a duplicate in the DLQ, never a loss."""
    headers = dict(delivery.headers)
    headers[HEADERS.REJECT_REASON] = reason[:1000]
    headers[HEADERS.REJECT_CODE] = code
    headers[HEADERS.REJECTED_BY] = rejected_by
    headers["x-original-routing-key"] = delivery.routing_key
    headers["x-original-exchange"] = delivery.exchange
    if field is not None:
        headers[HEADERS.REJECT_FIELD] = field
    await transport.publish(
        topology.dead_letter_exchange,
        delivery.routing_key,
        delivery.to_outgoing(headers=headers, user_id=None),
        mandatory=False,
    )
    await delivery.ack()
