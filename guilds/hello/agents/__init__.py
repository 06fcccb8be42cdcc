"""The agents of the hello guild."""
