"""`Greeter`: answers `{"name": ...}` requests with a `Greeting`."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel

from rustic import Agent, ProcessContext, processor


class GreeterProps(BaseModel):
    """The greeter's properties in the guild file."""

    greeting: str = "Hello"


class GreetingRequest(BaseModel):
    """Who to greet; `rustic send greetings '{"name": "Ada"}'` sends one."""

    name: str = "world"


class Greeting(BaseModel):
    """The answer the greeter publishes on the default topic."""

    text: str
    name: str


class Greeter(Agent[GreeterProps]):
    """Greets whoever a request names and counts the greetings in its state."""

    @processor(dict)
    def greet(self, ctx: ProcessContext[dict[str, Any]]) -> None:
        """Validate the request, count it, publish the greeting.

        The handler takes any format so that a bare `rustic send` (format `dict`) works; a
        payload that does not validate fails the handler and ends in the dead letters.
        """
        request = GreetingRequest.model_validate(ctx.payload)
        greeted = ctx.state.get().get("greeted", 0) + 1
        ctx.state.update({"greeted": greeted})
        ctx.send(Greeting(text=f"{self.config.greeting}, {request.name}!", name=request.name))
