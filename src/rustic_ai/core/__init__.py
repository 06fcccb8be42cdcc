"""RusticAI core import paths, re-exported from rustic."""
