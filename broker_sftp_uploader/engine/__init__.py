"""The engine of a sync: ``plan`` (what to do, from the broker's listing and the ledger; pure), ``apply``
(do it, one action at a time), ``report`` (what was done), ``progress`` (the terminal line), and
``audit`` (the server's folder against the ledger)."""
