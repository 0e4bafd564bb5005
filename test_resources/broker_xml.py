"""Wire formats of the AKTIN broker emulator: records, XML documents, media types, XPath filter.

Everything here follows `docs/broker-api.md` (§2.2 serialization, §2.3 timestamps,
§3.7 filtered search, §3.14 bundle naming). The HTTP side lives in `broker_emulator.py`.
"""

from __future__ import annotations

import re
import urllib.parse
from dataclasses import dataclass, field
from datetime import datetime, timezone
from xml.sax.saxutils import escape

from lxml import etree

NS = "http://aktin.org/ns/exchange"
XML_DECLARATION = '<?xml version="1.0" encoding="UTF-8" standalone="yes"?>'
BROKER_VERSION = "1.5.3-SNAPSHOT"
# Timestamp columns of a node status row, in the element order of `request-status-info`.
STATUS_COLUMNS = (
    "deleted",
    "retrieved",
    "queued",
    "processing",
    "completed",
    "rejected",
    "failed",
    "expired",
    "interaction",
)

_JAVA_INT = re.compile(r"[+-]?[0-9]+")


def java_int(text: str) -> int | None:
    """Parse like Java `Integer.parseInt`; None when Java would throw NumberFormatException."""
    if not _JAVA_INT.fullmatch(text):
        return None
    value = int(text)
    return value if -(2**31) <= value < 2**31 else None


# ------------------------------------------------------------------------------------------- records


@dataclass
class RequestInfo:
    """A request row (definitions are stored separately, as in the broker's database)."""

    id: int
    published: datetime | None = None
    closed: datetime | None = None
    targeted: bool = False
    targets: list[int] = field(default_factory=list)


@dataclass
class StatusRow:
    """One row of the node-status table: timestamps per status word plus an optional message."""

    node: int
    times: dict[str, datetime] = field(default_factory=dict)
    message_type: str | None = None
    message: str | None = None


@dataclass
class NodeInfo:
    """A registered node (created on first authenticated contact with a node key)."""

    id: int
    dn: str
    last_contact: datetime


# ---------------------------------------------------------------------------------------------- time


def _fraction(nanos: int) -> str:
    if nanos == 0:
        return ""
    if nanos % 1_000_000 == 0:
        return f".{nanos // 1_000_000:03d}"
    if nanos % 1_000 == 0:
        return f".{nanos // 1_000:06d}"
    return f".{nanos:09d}"


def instant(moment: datetime) -> str:
    """Format an aware datetime like Java `Instant.toString()` (fraction in groups of 3 digits)."""
    utc = moment.astimezone(timezone.utc)
    return utc.strftime("%Y-%m-%dT%H:%M:%S") + _fraction(utc.microsecond * 1000) + "Z"


def instant_ns(epoch_ns: int) -> str:
    """Format nanoseconds since the epoch like Java `Instant.toString()`."""
    seconds, nanos = divmod(epoch_ns, 10**9)
    return (
        datetime.fromtimestamp(seconds, timezone.utc).strftime("%Y-%m-%dT%H:%M:%S") + _fraction(nanos) + "Z"
    )


def now_micros() -> datetime:
    """Current time with HSQL TIMESTAMP(6) precision (used for `published`/`closed`)."""
    return datetime.now(timezone.utc)


def now_millis() -> datetime:
    """Current time with millisecond precision (node status timestamps, last contact)."""
    moment = datetime.now(timezone.utc)
    return moment.replace(microsecond=moment.microsecond // 1000 * 1000)


# ----------------------------------------------------------------------------------------------- XML


@dataclass
class El:
    """Minimal element: tag (possibly prefixed), text or child elements, attributes in output order."""

    tag: str
    content: str | list[El] = field(default_factory=list)
    attrs: dict[str, str] = field(default_factory=dict)


def render(root: El, pretty: bool = False) -> bytes:
    """Serialize like the JAXB RI: one line, or 4-space indented with a trailing newline."""
    out = [XML_DECLARATION, "\n" if pretty else ""]
    _write(root, out, 0 if pretty else None)
    return "".join(out).encode("utf-8")


def _write(node: El, out: list[str], level: int | None) -> None:
    pad, newline = ("    " * level, "\n") if level is not None else ("", "")
    attrs = "".join(f' {name}="{escape(value, {chr(34): "&quot;"})}"' for name, value in node.attrs.items())
    if isinstance(node.content, str):
        out.append(f"{pad}<{node.tag}{attrs}>{escape(node.content)}</{node.tag}>{newline}")
    elif not node.content:
        out.append(f"{pad}<{node.tag}{attrs}/>{newline}")
    else:
        out.append(f"{pad}<{node.tag}{attrs}>{newline}")
        for child in node.content:
            _write(child, out, None if level is None else level + 1)
        out.append(f"{pad}</{node.tag}>{newline}")


def broker_status_doc(epoch_ns: int) -> El:
    """`broker-status` of §3.1 (no `uptime`)."""
    modules = [
        El("module", [El("version", BROKER_VERSION)], {"id": name})
        for name in ("broker-api", "broker-server")
    ]
    return El(
        "broker-status", [El("timestamp", instant_ns(epoch_ns)), El("node-software", modules)], {"xmlns": NS}
    )


def status_children(row: StatusRow, node: int, with_type: bool) -> list[El]:
    """`node`, the set timestamps in column order and (optionally) the message `type`."""
    children = [El("node", str(node))]
    children += [El(word, instant(row.times[word])) for word in STATUS_COLUMNS if word in row.times]
    if with_type and row.message_type is not None:
        children.append(El("type", row.message_type))
    return children


def request_el(
    info: RequestInfo, types: list[str], own_status: StatusRow | None = None, root: bool = False
) -> El:
    """A `request` element: published?, closed?, targeted, type*, node-status? (§3.5, §3.9)."""
    children = []
    if info.published is not None:
        children.append(El("published", instant(info.published)))
    if info.closed is not None:
        children.append(El("closed", instant(info.closed)))
    children.append(El("targeted", "true" if info.targeted else "false"))
    children += [El("type", media_type) for media_type in types]
    if own_status is not None:
        # Quirk (§3.9): the node inside node-status is always 0.
        children.append(El("node-status", status_children(own_status, 0, with_type=False)))
    attrs = {"xmlns": NS, "id": str(info.id)} if root else {"id": str(info.id)}
    return El("request", children, attrs)


def list_doc(tag: str, children: list[El]) -> El:
    """A default-namespace list root (`request-list`, `request-status-list`, `result-list`, `nodes`)."""
    return El(tag, children, {"xmlns": NS})


def status_list_doc(rows: list[StatusRow]) -> El:
    """`request-status-list` of §3.8."""
    return list_doc(
        "request-status-list",
        [El("request-status-info", status_children(row, row.node, with_type=True)) for row in rows],
    )


def result_list_doc(results: list[tuple[int, str]]) -> El:
    """`result-list` of the admin aggregator endpoint: (node, media type) pairs."""
    return list_doc(
        "result-list",
        [El("result", [El("node", str(node)), El("type", media_type)]) for node, media_type in results],
    )


def node_el(node: NodeInfo, root: bool = False) -> El:
    """An `ns2:node` element (§3.13); as a root it declares ns2 and ends with empty `modules`."""
    children = [
        El("ns2:id", str(node.id)),
        El("ns2:clientDN", node.dn),
        El("ns2:last-contact", instant(node.last_contact)),
        El("ns2:websocket", "false"),
    ]
    if root:
        children.append(El("ns2:modules"))
    return El("ns2:node", children, {"xmlns:ns2": NS} if root else {})


def node_list_doc(nodes: list[NodeInfo]) -> El:
    """`ns2:node-list` of §3.13 (prefixed, unlike every other document)."""
    return El("ns2:node-list", [node_el(node) for node in nodes], {"xmlns:ns2": NS})


def target_nodes_doc(nodes: list[int]) -> El:
    """`nodes` document used for targeting and `node-restriction.xml`."""
    return list_doc("nodes", [El("node", str(node)) for node in nodes])


def parse_target_nodes(body: bytes) -> list[int]:
    """Node ids of a `nodes` document; ValueError when it is not one."""
    try:
        root = etree.fromstring(body, etree.XMLParser(no_network=True))
        return [int(node.text) for node in root.findall(f"{{{NS}}}node")]
    except (etree.XMLSyntaxError, TypeError) as exc:
        raise ValueError("not a nodes document") from exc


# --------------------------------------------------------------------------------------- media types


def base_type(content_type: str) -> str:
    """Media type with all parameters removed."""
    return content_type.split(";", 1)[0].strip()


def jersey_type(content_type: str) -> str:
    """Media type with parameters, re-printed the way Jersey prints it (`text/csv;charset=UTF-8`)."""
    params = [part.strip() for part in content_type.split(";")[1:] if part.strip()]
    return ";".join([base_type(content_type)] + [re.sub(r"\s*=\s*", "=", p, count=1) for p in params])


def charset_of(content_type: str) -> str:
    """The charset parameter, UTF-8 by default."""
    for part in content_type.split(";")[1:]:
        name, _, value = part.partition("=")
        if name.strip().lower() == "charset" and value.strip():
            return value.strip().strip('"')
    return "UTF-8"


def extension(media_type: str) -> str:
    """File extension for bundle entries (§3.14)."""
    media_type = base_type(media_type)
    if media_type.endswith("xml"):
        return ".xml"
    if media_type.endswith("json"):
        return ".json"
    if media_type.startswith("text"):
        return ".txt"
    if media_type == "application/zip":
        return ".zip"
    return ""


def url_encode(text: str) -> str:
    """Java `URLEncoder.encode(text, UTF-8)`."""
    return urllib.parse.quote_plus(text, safe="*").replace("~", "%7E")


def quality(accept: str | None, media_type: str) -> float:
    """q-value that an Accept header gives `media_type` (most specific matching range wins)."""
    if accept is None or not accept.strip():
        return 1.0
    wanted_type, _, wanted_sub = media_type.lower().partition("/")
    best = (-1, 0.0)
    for item in accept.split(","):
        rng, *params = item.split(";")
        range_type, _, range_sub = rng.strip().lower().partition("/")
        q = 1.0
        for param in params:
            name, _, value = param.partition("=")
            if name.strip().lower() == "q":
                try:
                    q = float(value)
                except ValueError:
                    q = 0.0
        if range_type in ("*", wanted_type) and range_sub in ("*", wanted_sub):
            specificity = (range_type != "*") + (range_sub != "*")
            if specificity > best[0]:
                best = (specificity, q)
    return best[1]


# ----------------------------------------------------------------------------------- filtered search

# XPath 1.0 core function library: name -> (min args, max args or None).
_FUNCTIONS = {
    "last": (0, 0),
    "position": (0, 0),
    "count": (1, 1),
    "id": (1, 1),
    "local-name": (0, 1),
    "namespace-uri": (0, 1),
    "name": (0, 1),
    "string": (0, 1),
    "concat": (2, None),
    "starts-with": (2, 2),
    "contains": (2, 2),
    "substring-before": (2, 2),
    "substring-after": (2, 2),
    "substring": (2, 3),
    "string-length": (0, 1),
    "normalize-space": (0, 1),
    "translate": (3, 3),
    "boolean": (1, 1),
    "not": (1, 1),
    "true": (0, 0),
    "false": (0, 0),
    "lang": (1, 1),
    "number": (0, 1),
    "sum": (1, 1),
    "floor": (1, 1),
    "ceiling": (1, 1),
    "round": (1, 1),
}
_NODE_TYPES = {"comment", "text", "processing-instruction", "node"}
_NCNAME = r"[^\W\d][\w.\-]*"
_TOKEN = re.compile(
    rf"""\s*(?:(?P<literal>"[^"]*"|'[^']*')|(?P<number>\d+(?:\.\d*)?|\.\d+)|(?P<var>\${_NCNAME}(?::{_NCNAME})?)
    |(?P<name>{_NCNAME}(?::(?:{_NCNAME}|\*))?)|(?P<op>//|::|\.\.|!=|<=|>=|[/.=<>|+\-*()\[\],@]))""",
    re.VERBOSE,
)
_OPERATORS = {"/", "//", "|", "+", "-", "=", "!=", "<", "<=", ">", ">="}


class InvalidPredicate(ValueError):
    """The predicate does not compile as XPath 1.0 (the broker answers 400)."""


def _tokens(expression: str) -> list[str]:
    """XPath 1.0 tokens (the expression already compiled, so it is well-formed)."""
    tokens, pos = [], 0
    while pos < len(expression.rstrip()):
        match = _TOKEN.match(expression, pos)
        if match is None:
            break
        tokens.append(match.group(match.lastgroup))
        pos = match.end()
    return tokens


def _check_function_calls(expression: str) -> None:
    """Reject unknown functions and wrong arities, which JAXP rejects at compile time and libxml2 only
    at evaluation time. Uses the XPath 1.0 lexical disambiguation rules (spec §3.7)."""
    tokens = _tokens(expression)
    operator_before = False  # whether the previous token was an operator (or there is none)
    for index, token in enumerate(tokens):
        after_operand = (
            index > 0 and not operator_before and tokens[index - 1] not in ("@", "::", "(", "[", ",")
        )
        if token[0].isalpha() or token[0] == "_":
            if after_operand:  # an OperatorName: and, or, mod, div
                operator_before = True
                continue
            operator_before = False
            if index + 1 < len(tokens) and tokens[index + 1] == "(" and token not in _NODE_TYPES:
                _check_arity(token, tokens, index + 1)
        else:
            operator_before = token in _OPERATORS or (token == "*" and after_operand)


def _check_arity(name: str, tokens: list[str], open_index: int) -> None:
    """The called function must be a core function and get an allowed number of arguments."""
    if name not in _FUNCTIONS:
        raise InvalidPredicate(f"unknown function {name}()")
    depth, args = 0, 0
    for token in tokens[open_index:]:
        if token in ("(", "["):
            depth += 1
        elif token in (")", "]"):
            depth -= 1
            if depth == 0:
                break
        elif token == "," and depth == 1:
            args += 1
    if tokens[open_index + 1 : open_index + 2] != [")"]:
        args += 1
    low, high = _FUNCTIONS[name]
    if args < low or (high is not None and args > high):
        raise InvalidPredicate(f"wrong number of arguments for {name}()")


def compile_predicate(predicate: str) -> etree.XPath:
    """Compile the filter predicate; the result evaluates to True iff `string((predicate))` is `true`,
    with the document node as context (as the broker evaluates against the DOM document)."""
    try:
        etree.XPath(predicate)
    except etree.XPathError as exc:
        raise InvalidPredicate(str(exc)) from exc
    _check_function_calls(predicate)
    return etree.XPath(f"boolean((/)[string(({predicate}))='true'])")


def definition_matches(xpath: etree.XPath, definition: str) -> bool:
    """Evaluate a compiled predicate namespace-unaware against one stored definition (§3.7).

    Unprefixed elements lose their (default) namespace, prefixed ones keep theirs, so `//tag` matches
    the former only. Unparseable definitions and evaluation errors give False (the broker skips them)."""
    parser = etree.XMLParser(encoding="utf-8", no_network=True, load_dtd=False)
    try:
        root = etree.fromstring(definition.encode("utf-8"), parser)
    except etree.XMLSyntaxError:
        return False
    for element in root.iter():
        if isinstance(element.tag, str) and element.prefix is None and element.tag.startswith("{"):
            element.tag = etree.QName(element).localname
    try:
        return bool(xpath(root))
    except etree.XPathError:
        return False
