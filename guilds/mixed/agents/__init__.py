"""The agents of the mixed-engines guild."""
