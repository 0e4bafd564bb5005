"""The AKTIN broker's API: ``client`` (HTTP calls with hard deadlines and size limits) and ``documents``
(the broker's XML, parsed as it arrives)."""
