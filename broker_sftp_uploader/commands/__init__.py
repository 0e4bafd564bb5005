"""One module per command, named as it is typed: ``sync``, ``check``, ``status`` and ``keys`` (keygen,
fingerprint, decrypt). Each takes a validated config and options and returns what the CLI prints; none
knows click."""
