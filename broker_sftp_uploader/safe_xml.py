"""The one hardened lxml parser set-up for XML we did not write ourselves (the broker's answers, a ledger).

Entities are not expanded, no DTD is loaded, nothing is fetched over the network, and lxml's limits on
depth and text size stay on (``huge_tree=False``): a hostile document can neither read local files
(XXE) nor blow up memory with nested entities.
"""

from __future__ import annotations

from lxml import etree

_HARDENED = {"resolve_entities": False, "no_network": True, "load_dtd": False, "huge_tree": False}


def pull_parser(**options: object) -> etree.XMLPullParser:
    """A hardened incremental parser (feed it pieces, read its events); ``options`` add to the hardening."""
    return etree.XMLPullParser(**_HARDENED, **options)


def tree_parser(**options: object) -> etree.XMLParser:
    """A hardened parser for ``etree.parse``; ``options`` add to the hardening."""
    return etree.XMLParser(**_HARDENED, **options)
