"""The daemon: lifecycle, control socket and runtime files of a running guild."""
