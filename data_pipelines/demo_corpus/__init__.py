"""The embedded demo corpus: synthetic multi-speaker, multi-session speech."""
