"""Compatibility namespace: the import paths of the RusticAI documentation, served by rustic."""
