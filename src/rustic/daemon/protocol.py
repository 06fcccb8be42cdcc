"""Control protocol: one JSON request per line from the CLI to a daemon, one JSON reply back."""

from __future__ import annotations

import json
from typing import Any

PROTOCOL_VERSION = 1
MAX_REQUEST_BYTES = 64 * 1024
# After these the two ends of a connection no longer agree on where a line starts.
CONNECTION_ENDING_CODES = frozenset({"too_large", "bad_reply"})

_JSON_TYPES = {dict: "object", list: "array", str: "string", bool: "boolean", type(None): "null"}


class ControlError(Exception):
    """An error reply of the control protocol, with its `code` and `message`.

    The client raises it for an error reply; a handler raises it to choose the code of its
    own reply (any other exception from a handler becomes `failed`).
    """

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message


def decode_request(line: bytes) -> dict[str, Any]:
    """Parse a request line into a JSON object, or raise a `bad_request` `ControlError`."""
    try:
        request = json.loads(line)
    except (ValueError, RecursionError) as exc:
        raise ControlError("bad_request", f"request is not valid JSON: {exc}") from None
    if not isinstance(request, dict):
        message = f"request must be a JSON object; got {json_type(request)}"
        raise ControlError("bad_request", message)
    return request


def result_of(line: bytes, request_id: int) -> Any:
    """Return the result of a reply line to request `request_id`, or raise its error."""
    try:
        reply = json.loads(line)
    except ValueError as exc:
        raise ControlError("bad_reply", f"reply is not valid JSON: {exc}") from None
    if not isinstance(reply, dict) or not isinstance(reply.get("ok"), bool):
        raise ControlError("bad_reply", f"reply is not a protocol reply: {line[:200]!r}")
    if reply.get("id") not in (request_id, None):
        raise ControlError("bad_reply", f"reply id {reply.get('id')!r} is not {request_id}")
    if reply["ok"]:
        return reply.get("result")
    error = reply.get("error")
    if not isinstance(error, dict):
        raise ControlError("bad_reply", f"error reply without an error object: {line[:200]!r}")
    raise ControlError(str(error.get("code", "failed")), str(error.get("message", "")))


def encode(message: dict[str, Any]) -> bytes:
    """Serialise one protocol message as a compact JSON line."""
    return json.dumps(message, separators=(",", ":")).encode() + b"\n"


def encode_error(request_id: Any, error: ControlError) -> bytes:
    """Serialise the error reply that carries `error`."""
    body = {"code": error.code, "message": error.message}
    return encode({"v": PROTOCOL_VERSION, "ok": False, "error": body, "id": request_id})


def json_type(value: Any) -> str:
    """Name the JSON type of a decoded value, for error messages."""
    return _JSON_TYPES.get(type(value), "number")
