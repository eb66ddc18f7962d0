"""A coordinator (SQLite store) with the executor and task-loop reference modules and a
driver connection, on one prefix: what the sessionctl and console suites run against.
Torn down modules first, then the driver, then the coordinator."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass

from contracts import Topology
from coordinator.domain.identity import IdentityMap
from coordinator.service.runtime import CoordinatorRuntime
from reference_modules import Executor, ReferenceModule, TaskLoop
from transport.amqp import AmqpTransport


@dataclass
class ModuleSystem:
    runtime: CoordinatorRuntime
    modules: list[ReferenceModule]
    driver: AmqpTransport


@asynccontextmanager
async def module_system(
    amqp_url: str, topology: Topology, store: str, name: str, identity: str
) -> AsyncIterator[ModuleSystem]:
    runtime = CoordinatorRuntime(
        AmqpTransport(amqp_url, connection_name=f"{name} coordinator"),
        store=store,
        topology=topology,
        identity=IdentityMap.parse(identity),
        health_interval=0.5,
    )
    await runtime.start()
    modules: list[ReferenceModule] = [
        cls(
            AmqpTransport(amqp_url, connection_name=f"{name} {cls.module_id}"),
            topology=topology,
            own_transport=True,
            heartbeat_interval=0.5,
        )
        for cls in (Executor, TaskLoop)
    ]
    for module in modules:
        await module.start()
    driver = AmqpTransport(amqp_url, connection_name=f"{name} driver")
    await driver.connect()
    try:
        yield ModuleSystem(runtime, modules, driver)
    finally:
        for module in modules:
            await module.close()
        await driver.close()
        await runtime.close()
