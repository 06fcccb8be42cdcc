"""Where a daemon keeps its runtime files: control socket, pid file and spill file."""

from __future__ import annotations

import logging
import os
import stat
import sys
from pathlib import Path

logger = logging.getLogger(__name__)

# sun_path holds 108 bytes on Linux and 104 on the BSDs and macOS, the terminating NUL included.
MAX_SOCKET_PATH_BYTES = 107 if sys.platform.startswith("linux") else 103

_SOCKET_SUFFIX = ".sock"


def runtime_dir(explicit: str | Path | None = None) -> Path:
    """Resolve the runtime dir without creating it.

    The first of: `explicit`, `$RUSTIC_RUNTIME_DIR`, `$XDG_RUNTIME_DIR/rustic`,
    `/tmp/rustic-<uid>`. Empty environment variables count as unset.
    """
    if explicit is not None:
        return Path(explicit).expanduser()
    if from_env := os.environ.get("RUSTIC_RUNTIME_DIR"):
        return Path(from_env).expanduser()
    if xdg := os.environ.get("XDG_RUNTIME_DIR"):
        return Path(xdg) / "rustic"
    return Path(f"/tmp/rustic-{os.getuid()}")


def ensure_runtime_dir(path: Path) -> Path:
    """Create `path` with mode 0700, or tighten an existing one of ours to 0700.

    Raises `PermissionError` when the directory belongs to another user: whoever owns
    it could read our control socket's traffic or plant a socket of their own.
    """
    path.mkdir(mode=0o700, parents=True, exist_ok=True)

    # Follow a symlink on purpose: what matters is who owns the directory we will use.
    info = path.stat()
    if not stat.S_ISDIR(info.st_mode):
        raise NotADirectoryError(f"runtime dir {path} exists but is not a directory")
    uid = os.getuid()
    if info.st_uid != uid:
        raise PermissionError(
            f"runtime dir {path} is owned by uid {info.st_uid}, not by this user (uid {uid}); "
            "remove it or set RUSTIC_RUNTIME_DIR to a directory you own"
        )

    # mkdir's mode is filtered by the umask and an existing dir keeps its old mode.
    if stat.S_IMODE(info.st_mode) != 0o700:
        path.chmod(0o700)
        logger.debug("runtime dir mode set to 0700 path=%s", path)
    return path


def socket_path(runtime_dir: Path, guild_id: str) -> Path:
    """Return the control socket path of `guild_id`: `<runtime_dir>/<guild_id>.sock`.

    Raises `ValueError` when the path is longer than a Unix socket address can hold
    (107 bytes on Linux); a shorter `RUSTIC_RUNTIME_DIR` is the fix.
    """
    path = _guild_file(runtime_dir, guild_id, _SOCKET_SUFFIX)
    size = len(os.fsencode(path))
    if size > MAX_SOCKET_PATH_BYTES:
        raise ValueError(
            f"control socket path {path} is {size} bytes; it must be at most "
            f"{MAX_SOCKET_PATH_BYTES}: set RUSTIC_RUNTIME_DIR to a shorter directory"
        )
    return path


def pid_path(runtime_dir: Path, guild_id: str) -> Path:
    """Return the pid file path of `guild_id`: `<runtime_dir>/<guild_id>.pid`."""
    return _guild_file(runtime_dir, guild_id, ".pid")


def spill_path(runtime_dir: Path, guild_id: str) -> Path:
    """Return where undelivered memory-bus messages of `guild_id` are spilled at stop."""
    return _guild_file(runtime_dir, guild_id, ".spill.jsonl")


def list_guild_sockets(runtime_dir: Path) -> list[str]:
    """Return the sorted ids of the guilds that have a socket file in `runtime_dir`.

    A socket file left by a crashed daemon is listed too; only a connect tells them apart.
    """
    if not runtime_dir.is_dir():
        return []
    return sorted(
        entry.name.removesuffix(_SOCKET_SUFFIX)
        for entry in runtime_dir.iterdir()
        if entry.name.endswith(_SOCKET_SUFFIX) and entry.is_socket()
    )


def _guild_file(runtime_dir: Path, guild_id: str, suffix: str) -> Path:
    """Join a guild's file name to the runtime dir, refusing ids that would escape it."""
    if not guild_id or guild_id in {".", ".."} or "/" in guild_id or "\0" in guild_id:
        raise ValueError(
            f"guild id must be a non-empty file name without '/' or NUL; got {guild_id!r}"
        )
    return runtime_dir / f"{guild_id}{suffix}"
