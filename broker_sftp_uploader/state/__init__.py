"""What a run keeps in WORKING_DIR: ``ledger`` (status.xml), ``journal`` (partial uploads in flight),
``lock`` (one run at a time) and ``atomic`` (crash-safe file writes)."""
