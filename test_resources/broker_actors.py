"""The broker admin and hospital nodes of the integration test, acting over real HTTP.

Python: ``create_request(url, "rki")``, ``post_status(url, NODE1_KEY, 0, "completed")``, ...; most tests need
just ``publish_completed(url)``: a request a node has answered.
Shell:  ``python -m test_resources.broker_actors URL create rki`` (see ``--help``).
Every function raises `BrokerActorError` when the broker answers an unexpected status.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
from pathlib import Path

import requests
from lxml import etree

# The original integration test's keys; the broker emulator accepts these (it takes them from here).
ADMIN_KEY = "xxxAdmin1234"
NODE1_KEY = "xxxApiKey123"
NODE2_KEY = "xxxApiKey567"
NS = "http://aktin.org/ns/exchange"
QUERY_REQUEST_TYPE = "application/vnd.aktin.query.request+xml"
TIMEOUT = 60.0
# The request body of the original integration test (docs/broker-api.md §3.2); TAG is replaced.
REQUEST_TEMPLATE = (
    '<queryRequest xmlns="http://aktin.org/ns/exchange" xmlns:xsi="http://www.w3.org/2001/XMLSchema-instance">'
    "<id>1337</id><reference>2020-01-01T00:00:00.000Z</reference><scheduled>2020-01-01T12:00:00.000Z</scheduled>"
    "<query><title>Title of request</title><description>Description of request</description><principal>"
    "<name>Name of creator</name><organisation>Organisation of creator</organisation>"
    "<email>Email of createor</email><phone/><tags><tag>TAG</tag></tags></principal>"
    '<schedule xsi:type="repeatedExecution"><duration>-P6M</duration><interval/><intervalHours/><id>1</id>'
    '</schedule><sql xmlns="http://aktin.org/ns/i2b2/sql"><source type="application/sql">'
    "SELECT * FROM fhir_observation</source></sql></query></queryRequest>"
)


class BrokerActorError(RuntimeError):
    """The broker answered something the actor did not expect."""


def _call(method: str, url: str, key: str, expected: int, **kwargs) -> requests.Response:
    headers = {"Authorization": f"Bearer {key}", **kwargs.pop("headers", {})}
    response = requests.request(method, url, headers=headers, timeout=TIMEOUT, **kwargs)
    if response.status_code != expected:
        raise BrokerActorError(f"{method} {url} answered {response.status_code}, expected {expected}")
    return response


def request_body(tag: str) -> str:
    """The integration-test request definition for `tag`."""
    return REQUEST_TEMPLATE.replace("TAG", tag)


def create_request(base_url: str, tag: str, admin_key: str = ADMIN_KEY, publish: bool = True) -> int:
    """Create (and by default publish) a query request tagged `tag`; returns its id."""
    response = _call(
        "POST",
        f"{base_url}/broker/request",
        admin_key,
        201,
        data=request_body(tag).encode("utf-8"),
        headers={"Content-Type": QUERY_REQUEST_TYPE},
    )
    match = re.search(r"/broker/request/([0-9]+)$", response.headers.get("Location", ""))
    if match is None:
        raise BrokerActorError(f"no request id in Location {response.headers.get('Location')!r}")
    request_id = int(match.group(1))
    if publish:
        publish_request(base_url, request_id, admin_key)
    return request_id


def publish_request(base_url: str, request_id: int | str, admin_key: str = ADMIN_KEY) -> None:
    """Publish a request to the nodes."""
    _call("POST", f"{base_url}/broker/request/{request_id}/publish", admin_key, 204)


def delete_request(base_url: str, request_id: int | str, admin_key: str = ADMIN_KEY) -> None:
    """Delete a request (the broker keeps its status rows and results)."""
    _call("DELETE", f"{base_url}/broker/request/{request_id}", admin_key, 204)


def node_list_requests(base_url: str, node_key: str) -> bytes:
    """The node's `GET /broker/my/request` document."""
    return _call(
        "GET", f"{base_url}/broker/my/request", node_key, 200, headers={"Accept": "application/xml"}
    ).content


def count_requests(base_url: str, node_key: str) -> int:
    """Number of requests open for the node (`request` children of its request list)."""
    root = etree.fromstring(node_list_requests(base_url, node_key))
    return len(root.findall(f"{{{NS}}}request"))


def post_status(base_url: str, node_key: str, request_id: int | str, status: str) -> None:
    """Report a status word (`retrieved`, `completed`, ...) for a request, as a node."""
    _call("POST", f"{base_url}/broker/my/request/{request_id}/status/{status}", node_key, 204)


def put_result(
    base_url: str, node_key: str, request_id: int | str, data: bytes | Path, content_type: str = "text/csv"
) -> None:
    """Upload a node's result; a Path is streamed from disk."""
    url = f"{base_url}/aggregator/my/request/{request_id}/result"
    headers = {"Content-Type": content_type}
    if isinstance(data, Path):
        with data.open("rb") as stream:
            _call("PUT", url, node_key, 204, data=stream, headers=headers)
    else:
        _call("PUT", url, node_key, 204, data=data, headers=headers)


def publish_completed(
    base_url: str, tag: str = "rki", *, node_key: str = NODE1_KEY, result: bytes | Path = b"a;b\n"
) -> str:
    """Create and publish a request tagged `tag`, upload `result` for it as node `node_key` (a Path is
    streamed from disk) and report it completed; returns its id, as the uploader names it (a string)."""
    request_id = create_request(base_url, tag)
    put_result(base_url, node_key, request_id, result)
    post_status(base_url, node_key, request_id, "completed")
    return str(request_id)


def write_incompressible_file(path: Path, mebibytes: int) -> Path:
    """Write ``mebibytes`` MiB of random bytes to ``path``, a large result that the broker's deflate cannot
    shrink (one random MiB repeated: far beyond deflate's 32 KiB window); returns ``path``."""
    block = os.urandom(1024 * 1024)
    with open(path, "wb") as handle:
        handle.writelines(block for _ in range(mebibytes))
    return path


def count_nodes(base_url: str, admin_key: str = ADMIN_KEY) -> int:
    """Number of registered nodes (`GET /broker/node`)."""
    response = _call("GET", f"{base_url}/broker/node", admin_key, 200, headers={"Accept": "application/xml"})
    return len(etree.fromstring(response.content).findall(f"{{{NS}}}node"))


def main(argv: list[str] | None = None) -> int:
    """Command line: `URL create TAG | delete ID | count-requests NODEKEY | post-status NODEKEY ID STATUS
    | put-result NODEKEY ID TEXT | count-nodes`."""
    parser = argparse.ArgumentParser(
        prog="python -m test_resources.broker_actors",
        description="Act as broker admin or node against a broker URL.",
    )
    parser.add_argument("url", help="broker base URL, e.g. http://127.0.0.1:8080")
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("create", help="create and publish a request, print its id").add_argument("tag")
    commands.add_parser("delete", help="delete a request").add_argument("id", type=int)
    commands.add_parser("count-requests", help="print a node's open request count").add_argument("node_key")
    status = commands.add_parser("post-status", help="post a node status")
    status.add_argument("node_key")
    status.add_argument("id", type=int)
    status.add_argument("status")
    result = commands.add_parser("put-result", help="upload TEXT as a text/csv result")
    result.add_argument("node_key")
    result.add_argument("id", type=int)
    result.add_argument("text")
    commands.add_parser("count-nodes", help="print the number of registered nodes")
    args = parser.parse_args(argv)
    url = args.url.rstrip("/")
    try:
        if args.command == "create":
            print(create_request(url, args.tag))
        elif args.command == "delete":
            delete_request(url, args.id)
        elif args.command == "count-requests":
            print(count_requests(url, args.node_key))
        elif args.command == "post-status":
            post_status(url, args.node_key, args.id, args.status)
        elif args.command == "put-result":
            put_result(url, args.node_key, args.id, args.text.encode("utf-8"))
        else:
            print(count_nodes(url))
    except (BrokerActorError, requests.RequestException, etree.XMLSyntaxError) as error:
        print(f"broker_actors {args.command}: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
