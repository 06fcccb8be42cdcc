"""``rustic_ai.core.guild.execution``: the execution engines, re-exported from rustic."""

from rustic.engines import (
    AsyncioExecutionEngine,
    BaseExecutionEngine,
    MultithreadedExecutionEngine,
    SyncExecutionEngine,
)

__all__ = [
    "AsyncioExecutionEngine",
    "BaseExecutionEngine",
    "MultithreadedExecutionEngine",
    "SyncExecutionEngine",
]
