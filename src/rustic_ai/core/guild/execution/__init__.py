"""``rustic_ai.core.guild.execution``: the execution engines, re-exported from rustic."""

from rustic.engines import (
    BaseExecutionEngine,
    MultithreadedExecutionEngine,
    SyncExecutionEngine,
)

__all__ = ["BaseExecutionEngine", "MultithreadedExecutionEngine", "SyncExecutionEngine"]
