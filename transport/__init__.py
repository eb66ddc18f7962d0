"""sessionbus transport: the broker port and its two implementations.

``transport.port`` says what sessionbus needs from a broker; ``transport.amqp`` is
RabbitMQ through aio-pika, ``transport.memory`` an in-process broker with the same
rules (for tests and the embedded demo). ``transport.topology`` declares the names
``contracts.topology`` defines and dead-letters what cannot be processed;
``transport.audit`` reads the audit stream; ``transport.tracing`` carries trace
context in message headers; ``transport.settings`` declares and reads the
``SESSIONBUS_*`` settings every bus party shares. The coordinator and the module SDK
are built on this package; it knows neither of them.
"""

from transport.port import (
    AccessRefused,
    ConfirmTimeout,
    Delivery,
    OutgoingMessage,
    Transport,
    TransportClosed,
    TransportError,
    Unroutable,
)

__all__ = [
    "AccessRefused",
    "ConfirmTimeout",
    "Delivery",
    "OutgoingMessage",
    "Transport",
    "TransportClosed",
    "TransportError",
    "Unroutable",
]
