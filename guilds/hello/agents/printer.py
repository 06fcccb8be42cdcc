"""`Printer`: prints every greeting it hears."""

from __future__ import annotations

import logging
import sys
from typing import Literal

from pydantic import BaseModel

from agents.greeter import Greeting
from rustic import Agent, AgentFixtures, ProcessContext, processor

logger = logging.getLogger(__name__)


class PrinterProps(BaseModel):
    """Where the printer writes."""

    stream: Literal["stdout", "stderr"] = "stdout"


class Printer(Agent[PrinterProps]):
    """Writes each greeting on its own line, flushed at once."""

    def __init__(self) -> None:
        self.printed = 0

    @processor(Greeting)
    def show(self, ctx: ProcessContext[Greeting]) -> None:
        """Print the greeting's text."""
        stream = sys.stdout if self.config.stream == "stdout" else sys.stderr
        print(ctx.payload.text, file=stream, flush=True)
        self.printed += 1

    @AgentFixtures.on_shutdown
    def report(self) -> None:
        """Log how many greetings were printed."""
        logger.info("printer stopping printed=%d", self.printed)
