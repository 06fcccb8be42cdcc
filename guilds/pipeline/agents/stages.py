"""The three stages of the word-count pipeline: split, count (durably), report."""

from __future__ import annotations

import re
from typing import Any

from pydantic import BaseModel, Field

from rustic import Agent, ProcessContext, processor

WORD = re.compile(r"[a-z0-9']+")


class Line(BaseModel):
    """A line of text: `rustic send lines '{"text": "..."}'`."""

    text: str


class Words(BaseModel):
    """The words of one line, in order."""

    words: list[str]


class Counts(BaseModel):
    """Every count so far and how many words were counted in all."""

    counts: dict[str, int]
    total: int


class ReporterProps(BaseModel):
    """How many of the most frequent words the reporter prints."""

    top: int = Field(default=3, ge=1)


class Splitter(Agent):
    """Stage 1: splits lines into lowercase words."""

    @processor(dict)
    def split(self, ctx: ProcessContext[dict[str, Any]]) -> None:
        """Accept any format, so that a bare `rustic send` works."""
        line = Line.model_validate(ctx.payload)
        words = WORD.findall(line.text.lower())
        if words:
            ctx.send(Words(words=words), topic="words")


class Counter(Agent):
    """Stage 2: adds words to the counts in its state; the state store is SQLite."""

    @processor(Words)
    def count(self, ctx: ProcessContext[Words]) -> None:
        """Merge this line's counts into the state, then publish the totals."""
        counts: dict[str, int] = ctx.state.get().get("counts", {})
        for word in ctx.payload.words:
            counts[word] = counts.get(word, 0) + 1
        state = ctx.state.update({"counts": counts, "total": sum(counts.values())})
        ctx.send(Counts(counts=state["counts"], total=state["total"]), topic="counts")


class Reporter(Agent[ReporterProps]):
    """Stage 3: prints the most frequent words so far."""

    @processor(Counts)
    def report(self, ctx: ProcessContext[Counts]) -> None:
        """Print `top words: the=2, cat=1 (total 3)`."""
        ranked = sorted(ctx.payload.counts.items(), key=lambda item: (-item[1], item[0]))
        shown = ", ".join(f"{word}={n}" for word, n in ranked[: self.config.top])
        print(f"top words: {shown} (total {ctx.payload.total})", flush=True)
