"""The exit codes of `rustic run` and of the client commands, as named constants."""

from __future__ import annotations

from typing import Final

EXIT_OK: Final = 0
"""The guild stopped cleanly: every hook ran and every worker joined."""

EXIT_FAILURE: Final = 1
"""Something failed: a hook, a dependency, a handler that had to be abandoned, a thread that
did not join; for a client command, no daemon answered."""

EXIT_USAGE: Final = 2
"""A bad spec, flag or argument: nothing was started."""

EXIT_ALREADY_RUNNING: Final = 3
"""A live daemon already holds the control socket of this guild."""
