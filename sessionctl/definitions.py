"""RabbitMQ definitions for a sessionbus deployment, generated from the topology.

One broker user per module with exactly what the module SDK uses, a coordinator user,
an operator user for ``sessionctl``; policies for the quorum queues and the audit
stream's retention. The output loads with ``rabbitmqctl import_definitions`` or the
management API (``POST /api/definitions``), or as ``load_definitions`` at boot.
"""

from __future__ import annotations

import base64
import hashlib
import re
import secrets
from collections.abc import Mapping
from typing import Any

from contracts import Topology
from contracts.topology import (
    DEAD_LETTER_INBOX_DELIVERY_LIMIT,
    DEFAULT_AUDIT_RETENTION,
    DELIVERY_LIMIT,
)

__all__ = [
    "SEED_MODULES",
    "coordinator_permissions",
    "definitions",
    "module_permissions",
    "operator_permissions",
    "password_hash",
]

SEED_MODULES = (
    "ai-context-manager",
    "ai-integration",
    "executor",
    "task-loop",
    "step-processor",
    "executor-streamer",
    "frontend-api",
)


def _q(name: str) -> str:
    return re.escape(name)


def module_permissions(topology: Topology, module_id: str) -> dict[str, str]:
    """What the SDK does as a module, and nothing more:

    - configure its own queue (declare it);
    - write: bind its queue (write on the queue), commands and direct-reply requests
      (the default exchange), heartbeats, dead letters;
    - read: consume its queue, bind from the events exchange, direct reply-to.
    Not: publish to the events exchange, touch another module's queue.
    """
    queue = _q(topology.module_queue(module_id))
    return {
        "configure": f"^{queue}$",
        "write": (
            f"^({queue}|amq\\.default|{_q(topology.heartbeats_exchange)}"
            f"|{_q(topology.dead_letter_exchange)})$"
        ),
        "read": f"^({queue}|{_q(topology.events_exchange)}|amq\\.rabbitmq\\.reply-to.*)$",
    }


def coordinator_permissions(topology: Topology) -> dict[str, str]:
    """The coordinator owns everything under its prefix."""
    prefix = _q(topology.prefix)
    return {
        "configure": f"^{prefix}\\..*",
        "write": f"^({prefix}\\..*|amq\\.default)$",
        "read": f"^({prefix}\\..*|amq\\.rabbitmq\\.reply-to.*)$",
    }


def operator_permissions(topology: Topology) -> dict[str, str]:
    """``sessionctl``: commands, reading queues and the audit stream, replaying dead
    letters to where they came from; declares only the web console's own queues of
    events for its live pages."""
    prefix = _q(topology.prefix)
    return {
        "configure": f"^{_q(topology.console_queue_for(''))}.*$",
        "write": f"^({prefix}\\..*|amq\\.default)$",
        "read": f"^({prefix}\\..*|amq\\.rabbitmq\\.reply-to.*)$",
    }


def password_hash(password: str, salt: bytes | None = None) -> str:
    """RabbitMQ's ``rabbit_password_hashing_sha256``: base64(salt + sha256(salt + pw))."""
    salt = salt if salt is not None else secrets.token_bytes(4)
    digest = hashlib.sha256(salt + password.encode()).digest()
    return base64.b64encode(salt + digest).decode()


def definitions(
    topology: Topology,
    passwords: Mapping[str, str],
    *,
    vhost: str = "/",
    modules: tuple[str, ...] = SEED_MODULES,
    audit_retention: str = DEFAULT_AUDIT_RETENTION,
    user_prefix: str = "",
) -> dict[str, Any]:
    """The definitions document. ``passwords`` maps user names (module ids,
    ``coordinator``, ``operator``, each with ``user_prefix``) to passwords."""
    users: list[dict[str, Any]] = []
    permissions: list[dict[str, Any]] = []

    def add(name: str, perms: dict[str, str], tags: list[str]) -> None:
        user = f"{user_prefix}{name}"
        if user not in passwords:
            raise KeyError(f"no password for user {user!r}")
        users.append(
            {
                "name": user,
                "password_hash": password_hash(passwords[user]),
                "hashing_algorithm": "rabbit_password_hashing_sha256",
                "tags": tags,
                "limits": {},
            }
        )
        permissions.append({"user": user, "vhost": vhost, **perms})

    add("coordinator", coordinator_permissions(topology), [])
    add("operator", operator_permissions(topology), ["monitoring"])
    for module_id in modules:
        add(module_id, module_permissions(topology, module_id), [])
    prefix = _q(topology.prefix)
    return {
        "rabbitmq_version": "3.10.8",
        "vhosts": [{"name": vhost}],
        "users": users,
        "permissions": permissions,
        "topic_permissions": [],
        "policies": [
            {
                "vhost": vhost,
                "name": f"{topology.prefix}-audit-retention",
                "pattern": f"^{_q(topology.audit_stream)}$",
                "apply-to": "queues",
                "priority": 10,
                "definition": {"max-age": audit_retention},
            },
            # The same limits the queues are declared with (contracts.topology), so a
            # broker loaded from these definitions runs what the tests run.
            {
                "vhost": vhost,
                "name": f"{topology.prefix}-quorum",
                "pattern": f"^{prefix}\\.(commands|module\\..*|unroutable)(\\.\\d+)?$",
                "apply-to": "queues",
                "priority": 5,
                "definition": {
                    "delivery-limit": DELIVERY_LIMIT,
                    "dead-letter-exchange": topology.dead_letter_exchange,
                },
            },
            {
                "vhost": vhost,
                "name": f"{topology.prefix}-dead-letter-inbox",
                "pattern": f"^{_q(topology.dead_letter_queue)}$",
                "apply-to": "queues",
                "priority": 5,
                "definition": {"delivery-limit": DEAD_LETTER_INBOX_DELIVERY_LIMIT},
            },
        ],
        "parameters": [],
        "global_parameters": [],
        "queues": [],
        "exchanges": [],
        "bindings": [],
    }
