"""``rustic_ai.core.guild.execution``: the execution engines, re-exported from rustic."""

from rustic.engines import (
    AsyncioExecutionEngine,
    BaseExecutionEngine,
    MultiprocessExecutionEngine,
    MultithreadedExecutionEngine,
    RayExecutionEngine,
    SyncExecutionEngine,
)

__all__ = [
    "AsyncioExecutionEngine",
    "BaseExecutionEngine",
    "MultiprocessExecutionEngine",
    "MultithreadedExecutionEngine",
    "RayExecutionEngine",
    "SyncExecutionEngine",
]
