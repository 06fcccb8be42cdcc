"""The agents of the pipeline guild."""
