"""`python -m rustic`: the same as the `rustic` command."""

from __future__ import annotations

from rustic.cli import main

if __name__ == "__main__":
    main()
