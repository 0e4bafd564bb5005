"""The broker emulator against the wire contract `docs/broker-api.md`, over real HTTP."""

from __future__ import annotations

import hashlib
import http.client
import io
import re
import resource
import signal
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
import zipfile
from pathlib import Path

import pytest
import requests

from test_resources import broker_actors as actors
from test_resources.broker_emulator import BrokerEmulator

REPO = Path(__file__).resolve().parents[2]
NS = "http://aktin.org/ns/exchange"
DECL = b'<?xml version="1.0" encoding="UTF-8" standalone="yes"?>'
ADMIN = {"Authorization": f"Bearer {actors.ADMIN_KEY}"}
NODE1 = {"Authorization": f"Bearer {actors.NODE1_KEY}"}
NODE2 = {"Authorization": f"Bearer {actors.NODE2_KEY}"}
QUERY_TYPE = "application/vnd.aktin.query.request+xml"
CSV = {"Content-Type": "text/csv"}
RESULT = b"a;b\\n1;2\\n3;4\\n"  # what the original test sends with curl -d (literal backslash-n)
DECL_RE = re.escape(DECL.decode())
MILLIS = r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d{3})?Z"
MICROS = r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d{3}|\.\d{6})?Z"


@pytest.fixture
def emulator(tmp_path):
    """A fresh emulator per test (ids start at 0 again)."""
    with BrokerEmulator(data_dir=tmp_path / "broker") as broker:
        yield broker


def call(
    broker: BrokerEmulator, method: str, path: str, auth: dict | None = None, **kwargs
) -> requests.Response:
    """One HTTP call; `auth` is a headers dict such as ADMIN."""
    headers = {**(auth or {}), **kwargs.pop("headers", {})}
    return requests.request(method, broker.url + path, headers=headers, timeout=30, **kwargs)


def status(broker: BrokerEmulator, method: str, path: str, auth: dict | None = None, **kwargs) -> int:
    """Only the status code of `call`."""
    return call(broker, method, path, auth, **kwargs).status_code


def create(broker: BrokerEmulator, body: str, content_type: str | None = "application/xml") -> int:
    """Create an unpublished request with an arbitrary definition."""
    headers = {"Content-Type": content_type} if content_type else {}
    response = call(broker, "POST", "/broker/request", ADMIN, data=body.encode("utf-8"), headers=headers)
    assert response.status_code == 201
    return int(response.headers["Location"].rsplit("/", 1)[1])


def filtered(broker: BrokerEmulator, predicate: str | None, media_type: str | None = QUERY_TYPE):
    """The filtered search as the uploader sends it."""
    params = {
        key: value for key, value in (("type", media_type), ("predicate", predicate)) if value is not None
    }
    return call(
        broker, "GET", "/broker/request/filtered", ADMIN, params=params, headers={"Accept": "application/xml"}
    )


def filtered_ids(broker: BrokerEmulator, predicate: str, media_type: str = QUERY_TYPE) -> list[str]:
    """Ids (strings) of the filtered search's direct children, as the uploader reads them."""
    response = filtered(broker, predicate, media_type)
    assert response.status_code == 200
    return [child.get("id") for child in ET.fromstring(response.content)]


def status_xml(broker: BrokerEmulator, request_id: int | str) -> bytes:
    """`GET /broker/request/{id}/status` body (must be 200)."""
    response = call(broker, "GET", f"/broker/request/{request_id}/status", ADMIN)
    assert response.status_code == 200
    assert response.headers["Content-Type"] == "application/xml"
    return response.content


def completion(document: bytes) -> str:
    """The uploader's completion string (docs/broker-api.md §5)."""
    root = ET.fromstring(document)
    nodes, completed = len(root.findall(f".//{{{NS}}}node")), len(root.findall(f".//{{{NS}}}completed"))
    return str(round(completed / nodes, 2) if nodes else 0.0)


def export(broker: BrokerEmulator, request_id: int) -> str:
    """Export a bundle; returns the download uuid."""
    response = call(
        broker, "POST", f"/broker/export/request-bundle/{request_id}", ADMIN, headers={"Accept": "text/plain"}
    )
    assert response.status_code == 200
    assert response.headers["Content-Type"] == "text/plain"
    assert re.fullmatch(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}", response.text)
    return response.text


def download(broker: BrokerEmulator, token: str) -> requests.Response:
    """Download without credentials."""
    return call(broker, "GET", f"/broker/download/{token}")


def bundle(broker: BrokerEmulator, request_id: int) -> zipfile.ZipFile:
    """Export and download a bundle, checking the download headers."""
    response = download(broker, export(broker, request_id))
    assert response.status_code == 200
    assert response.headers["Content-Type"] == "application/zip"
    assert response.headers["Content-Disposition"] == f'inline; filename="export_{request_id}.zip"'
    assert int(response.headers["Content-Length"]) == len(response.content)
    assert response.headers["Last-Modified"].endswith(" GMT")
    archive = zipfile.ZipFile(io.BytesIO(response.content))
    assert archive.comment == f"Bundle for request {request_id}".encode()
    assert all(info.compress_type == zipfile.ZIP_DEFLATED for info in archive.infolist())
    return archive


# ------------------------------------------------------------------------------------------ §6 trace


def test_section6_trace(emulator):
    url = emulator.url
    # 1. six creates + publishes alternating rki/default
    assert [actors.create_request(url, tag) for tag in ["rki", "default"] * 3] == [0, 1, 2, 3, 4, 5]
    # 2. client 1 lists 6 requests (and becomes node 0); the original test counts "id" substrings
    listing = actors.node_list_requests(url, actors.NODE1_KEY)
    assert actors.count_requests(url, actors.NODE1_KEY) == 6 == listing.count(b"id")
    # 3. one node; the original test counts "id" in the node list and halves it
    nodes = call(emulator, "GET", "/broker/node", ADMIN).content
    assert actors.count_nodes(url) == 1 == nodes.count(b"id") // 2
    # 4. client 1 uploads results and completes everything
    for request_id in range(6):
        actors.put_result(url, actors.NODE1_KEY, request_id, RESULT)
        actors.post_status(url, actors.NODE1_KEY, request_id, "completed")
    # 5. uploader run 1
    assert status(emulator, "HEAD", "/broker/status", ADMIN) == 200
    assert filtered_ids(emulator, "//tag='rki'") == ["0", "2", "4"]
    for request_id in (0, 2, 4):
        assert completion(status_xml(emulator, request_id)) == "1.0"
        archive = bundle(emulator, request_id)
        assert archive.namelist() == ["status.xml", "request.xml", "definition.xml", "0_result.txt"]
        assert archive.read("0_result.txt") == RESULT
        assert archive.read("definition.xml").decode() == actors.request_body("rki")
    # 6. two more requests, request 0 deleted
    assert actors.create_request(url, "rki") == 6
    assert actors.create_request(url, "default") == 7
    actors.delete_request(url, 0)
    # 7. client 2 sees 1..7, retrieves 1..5, becomes node 1
    listing = actors.node_list_requests(url, actors.NODE2_KEY)
    assert [child.get("id") for child in ET.fromstring(listing)] == [str(n) for n in range(1, 8)]
    assert listing.count(b"id") == 7
    for request_id in range(1, 6):
        actors.post_status(url, actors.NODE2_KEY, request_id, "retrieved")
    assert actors.count_nodes(url) == 2
    # 8. uploader run 2
    assert filtered_ids(emulator, "//tag='rki'") == ["2", "4", "6"]
    assert [completion(status_xml(emulator, n)) for n in (2, 4, 6)] == ["0.5", "0.5", "0.0"]
    assert completion(status_xml(emulator, 0)) == "1.0"  # stale rows of the deleted request
    assert [bundle(emulator, n).namelist()[-1] for n in (2, 4)] == ["0_result.txt"] * 2
    assert bundle(emulator, 6).namelist() == ["status.xml", "request.xml", "definition.xml"]
    assert status(emulator, "POST", "/broker/export/request-bundle/0", ADMIN) == 500


def test_export_bundle_documents_are_pretty_printed(emulator):
    actors.create_request(emulator.url, "rki")
    actors.post_status(emulator.url, actors.NODE1_KEY, 0, "retrieved")
    actors.post_status(emulator.url, actors.NODE1_KEY, 0, "completed")
    archive = bundle(emulator, 0)
    status = archive.read("status.xml").decode()
    assert re.fullmatch(
        f'{DECL_RE}\n<request-status-list xmlns="{NS}">\n    <request-status-info>\n        <node>0</node>\n'
        f"        <retrieved>{MILLIS}</retrieved>\n        <completed>{MILLIS}</completed>\n"
        "    </request-status-info>\n</request-status-list>\n",
        status,
    )
    assert re.fullmatch(
        f'{DECL_RE}\n<request xmlns="{NS}" id="0">\n    <published>{MICROS}</published>\n'
        "    <targeted>false</targeted>\n"
        f"    <type>{re.escape(QUERY_TYPE)}</type>\n</request>\n",
        archive.read("request.xml").decode(),
    )


def test_bundle_with_messages_mixed_types_and_targeting(emulator):
    for auth in (NODE1, NODE2):  # register node 0 and node 1
        call(emulator, "GET", "/broker/my/request", auth)
    request_id = create(emulator, '<q xmlns="urn:q"/>', "application/sql")
    extra = call(
        emulator, "PUT", "/broker/request/0", ADMIN, data="<x/>", headers={"Content-Type": "text/xml"}
    )
    assert extra.status_code == 204
    targets = f'<nodes xmlns="{NS}"><node>1</node></nodes>'
    xml = {"Content-Type": "application/xml"}
    assert status(emulator, "PUT", "/broker/request/0/nodes", ADMIN, data=targets, headers=xml) == 204
    assert status(emulator, "PUT", "/broker/request/0/nodes", ADMIN, data=targets) == 415
    assert call(emulator, "GET", "/broker/request/0/nodes", ADMIN).content == DECL + targets.encode()
    assert completion(status_xml(emulator, 0)) == "0.0"  # an empty row for the target node
    actors.publish_request(emulator.url, request_id)
    assert actors.count_requests(emulator.url, actors.NODE1_KEY) == 0
    assert b"<targeted>true</targeted>" in actors.node_list_requests(emulator.url, actors.NODE2_KEY)
    message = {"Content-Type": "text/plain; charset=UTF-8"}
    failed = call(emulator, "POST", "/broker/my/request/0/status/failed", NODE2, data="boom", headers=message)
    assert failed.status_code == 204
    actors.put_result(emulator.url, actors.NODE1_KEY, 0, b"x;y", "text/csv")
    actors.put_result(emulator.url, actors.NODE2_KEY, 0, b"{}", "application/json")
    archive = bundle(emulator, 0)
    assert archive.namelist() == [
        "status.xml",
        "1_info.txt",
        "node-restriction.xml",
        "request.xml",
        "definition_0",
        "definition_1.xml",
        "0_text%2Fcsv.txt",
        "1_application%2Fjson.json",
    ]
    assert archive.read("1_info.txt") == b"boom"
    assert archive.read("node-restriction.xml").decode() == (
        f'{DECL.decode()}\n<nodes xmlns="{NS}">\n    <node>1</node>\n</nodes>\n'
    )
    assert b"<type>text/plain</type>" in status_xml(emulator, 0)
    assert call(emulator, "GET", "/broker/request/0/status/1", ADMIN).text == "boom"
    assert status(emulator, "GET", "/broker/request/0/status/0", ADMIN) == 404
    assert status(emulator, "DELETE", "/broker/request/0/nodes", ADMIN) == 204
    assert status(emulator, "GET", "/broker/request/0/nodes", ADMIN) == 404
    assert actors.count_requests(emulator.url, actors.NODE1_KEY) == 1


# ------------------------------------------------------------------------------------------------ §7


def test_status_of_unknown_and_deleted_requests_is_200(emulator):
    empty = DECL + f'<request-status-list xmlns="{NS}"/>'.encode()
    assert status_xml(emulator, 42) == empty
    actors.create_request(emulator.url, "rki")
    actors.post_status(emulator.url, actors.NODE1_KEY, 0, "completed")
    actors.delete_request(emulator.url, 0)
    assert b"<completed>" in status_xml(emulator, 0)
    assert status(emulator, "GET", "/broker/request/x/status", ADMIN) == 404


def test_export_errors(emulator):
    assert status(emulator, "POST", "/broker/export/request-bundle/3", ADMIN) == 500
    assert status(emulator, "POST", "/broker/export/request-bundle/x", ADMIN) == 404
    assert status(emulator, "GET", "/broker/export/request-bundle/3", ADMIN) == 405
    create(emulator, "", content_type=None)  # a request without definition
    assert status(emulator, "POST", "/broker/export/request-bundle/0", ADMIN) == 500


def test_filtered_results_have_no_types_and_ignore_state(emulator):
    actors.create_request(emulator.url, "rki", publish=False)
    actors.create_request(emulator.url, "rki")
    assert status(emulator, "POST", "/broker/request/1/close", ADMIN) == 204
    response = filtered(emulator, "//tag='rki'")
    assert response.headers["Content-Type"] == "application/xml"
    assert re.fullmatch(
        DECL_RE + f'<request-list xmlns="{NS}"><request id="0"><targeted>false</targeted>'
        f'</request><request id="1"><published>{MICROS}</published><closed>{MICROS}</closed>'
        "<targeted>false</targeted></request></request-list>",
        response.text,
    )
    assert filtered(emulator, "//tag='none'").content == DECL + f'<request-list xmlns="{NS}"/>'.encode()


def test_node_documents_use_ns2_prefix(emulator):
    assert call(emulator, "GET", "/broker/node", ADMIN).content == (
        DECL + f'<ns2:node-list xmlns:ns2="{NS}"/>'.encode()
    )
    call(emulator, "GET", "/broker/my/request", NODE1)
    dn = "CN=Schwarzwaldklinik,O=Schwarzwaldklinik,L=Schwarzwald"
    node = (
        f"<ns2:id>0</ns2:id><ns2:clientDN>{dn}</ns2:clientDN><ns2:last-contact>{MILLIS}</ns2:last-contact>"
        "<ns2:websocket>false</ns2:websocket>"
    )
    assert re.fullmatch(
        f'{DECL_RE}<ns2:node-list xmlns:ns2="{NS}"><ns2:node>{node}</ns2:node></ns2:node-list>',
        call(emulator, "GET", "/broker/node", ADMIN).text,
    )
    assert re.fullmatch(
        f'{DECL_RE}<ns2:node xmlns:ns2="{NS}">{node}<ns2:modules/></ns2:node>',
        call(emulator, "GET", "/broker/node/0", ADMIN).text,
    )
    assert status(emulator, "GET", "/broker/node/7", ADMIN) == 404


def test_status_and_download_need_no_auth_and_downloads_repeat(emulator):
    response = call(emulator, "GET", "/broker/status", headers={"Authorization": "garbage"})
    assert response.status_code == 200
    assert re.fullmatch(
        DECL_RE + f'<broker-status xmlns="{NS}"><timestamp>[-0-9T:.]+Z</timestamp>'
        '<node-software><module id="broker-api"><version>1.5.3-SNAPSHOT</version></module>'
        '<module id="broker-server"><version>1.5.3-SNAPSHOT</version></module>'
        "</node-software></broker-status>",
        response.text,
    )
    head = call(emulator, "HEAD", "/broker/status")
    assert head.status_code == 200 and head.content == b""
    assert head.headers["Content-Type"] == "application/xml"
    actors.create_request(emulator.url, "rki")
    token = export(emulator, 0)
    first, second = download(emulator, token), download(emulator, token.upper())
    assert first.status_code == second.status_code == 200
    assert first.content == second.content
    assert download(emulator, "not-a-uuid").status_code == 404
    assert download(emulator, "3f2b1c9e-8a47-4d0e-9b1a-5c6d7e8f9a01").status_code == 404


def test_download_lifetime_counts_from_creation(tmp_path):
    with BrokerEmulator(data_dir=tmp_path, download_lifetime=0.4) as broker:
        actors.create_request(broker.url, "rki")
        token = export(broker, 0)
        assert download(broker, token).status_code == 200
        time.sleep(0.5)
        assert download(broker, token).status_code == 404
        assert list((tmp_path / "downloads").iterdir()) == []  # purged lazily at that lookup


def test_node_writes_need_no_existing_request(emulator):
    assert status(emulator, "POST", "/broker/my/request/99/status/completed", NODE1) == 204
    assert status(emulator, "PUT", "/aggregator/my/request/99/result", NODE1, data=b"r", headers=CSV) == 204
    assert completion(status_xml(emulator, 99)) == "1.0"
    results = call(emulator, "GET", "/aggregator/request/99/result", ADMIN).content
    expected = f'<result-list xmlns="{NS}"><result><node>0</node><type>text/csv</type></result></result-list>'
    assert results == DECL + expected.encode()
    assert call(emulator, "GET", "/aggregator/request/99/result/0", ADMIN).content == b"r"


# ---------------------------------------------------------------------------------- §2 auth, routing

ADMIN_ENDPOINTS = [
    ("GET", "/broker/request"),
    ("POST", "/broker/request"),
    ("GET", "/broker/request/0/status"),
    ("GET", f"/broker/request/filtered?type={QUERY_TYPE}&predicate=true()"),
    ("POST", "/broker/request/0/publish"),
    ("DELETE", "/broker/request/0"),
    ("GET", "/broker/node"),
    ("POST", "/broker/export/request-bundle/0"),
]
NODE_ENDPOINTS = [
    ("GET", "/broker/my/request"),
    ("POST", "/broker/my/request/0/status/retrieved"),
    ("PUT", "/aggregator/my/request/0/result"),
]
BAD_CREDENTIALS = [
    None,
    f"bearer {actors.ADMIN_KEY}",
    f"Bearer  {actors.ADMIN_KEY}",
    f"Bearer {actors.ADMIN_KEY} ",
    f"Basic {actors.ADMIN_KEY}",
    actors.ADMIN_KEY,
    f"Bearer {actors.ADMIN_KEY.lower()}",
    "Bearer nope",
]


@pytest.mark.parametrize("method,path", ADMIN_ENDPOINTS + NODE_ENDPOINTS)
def test_bad_credentials_are_401(emulator, method, path):
    for value in BAD_CREDENTIALS:
        headers = CSV | ({"Authorization": value} if value else {})
        response = call(emulator, method, path, headers=headers)
        assert response.status_code == 401, value
        assert "WWW-Authenticate" not in response.headers


@pytest.mark.parametrize("method,path", ADMIN_ENDPOINTS)
def test_node_key_on_admin_endpoint_is_401_and_registers_node(emulator, method, path):
    assert status(emulator, method, path, NODE2, headers=CSV) == 401
    assert actors.count_nodes(emulator.url) == 1


@pytest.mark.parametrize("method,path", NODE_ENDPOINTS)
def test_admin_key_on_node_endpoint_is_500(emulator, method, path):
    assert status(emulator, method, path, ADMIN, headers=CSV) == 500
    assert actors.count_nodes(emulator.url) == 0  # admins are never registered


def test_result_upload_needs_content_type_before_role_check(emulator):
    for auth in (ADMIN, NODE1):
        assert status(emulator, "PUT", "/aggregator/my/request/0/result", auth, data=b"x") == 400
    assert status(emulator, "PUT", "/aggregator/my/request/x/result", NODE1, data=b"x", headers=CSV) == 500


def test_inactive_and_custom_keys(tmp_path):
    keys = {"adm": "CN=Root,OU=admin", "old": "CN=Old,O=X,INACTIVE", "new": "CN=New,O=X"}
    with BrokerEmulator(data_dir=tmp_path, api_keys=keys) as broker:
        assert status(broker, "GET", "/broker/my/request", {"Authorization": "Bearer old"}) == 401
        assert status(broker, "GET", "/broker/my/request", {"Authorization": "Bearer new"}) == 200
        assert status(broker, "GET", "/broker/request", ADMIN) == 401  # default keys replaced
        assert actors.count_nodes(broker.url, admin_key="adm") == 1


def test_routing_errors_come_before_auth(emulator):
    assert status(emulator, "GET", "/broker/nothing") == 404
    assert status(emulator, "GET", "/") == 404
    assert status(emulator, "DELETE", "/broker/status") == 405
    assert status(emulator, "PUT", "/broker/node") == 405
    assert status(emulator, "GET", "/broker/request", headers={"Accept": "text/plain"}) == 406
    assert status(emulator, "GET", "/broker/request", headers={"Accept": "application/xml;q=0, */*"}) == 406
    xml = {"Accept": "application/xml"}
    assert status(emulator, "POST", "/broker/export/request-bundle/0", headers=xml) == 406
    assert status(emulator, "GET", "/broker/request", headers={"Accept": "application/*"}) == 401
    assert status(emulator, "GET", "/broker/download/x", headers={"Accept": "text/html"}) == 404
    assert status(emulator, "GET", "/broker/request/", ADMIN) == 200  # trailing slash tolerated


def test_request_lifecycle_and_deletion(emulator):
    response = call(
        emulator,
        "POST",
        "/broker/request",
        ADMIN,
        data="<a/>",
        headers={"Content-Type": "application/xml; charset=UTF-8"},
    )
    assert response.status_code == 201
    assert response.headers["Location"] == f"{emulator.url}/broker/request/0"
    assert create(emulator, "", content_type=None) == 1  # no definition: never listed
    listing = call(emulator, "GET", "/broker/request", ADMIN).text
    assert re.fullmatch(
        DECL_RE + f'<request-list xmlns="{NS}"><request id="0">'
        "<targeted>false</targeted><type>application/xml</type></request></request-list>",
        listing,
    )
    assert status(emulator, "POST", "/broker/request/0/publish", ADMIN) == 204
    published = re.search(
        r"<published>(.*?)</published>", call(emulator, "GET", "/broker/request", ADMIN).text
    )
    assert re.fullmatch(MICROS, published.group(1))
    assert status(emulator, "POST", "/broker/request/0/publish", ADMIN) == 204
    assert published.group(0) in call(emulator, "GET", "/broker/request", ADMIN).text  # unchanged
    definition = call(emulator, "GET", "/broker/request/0", ADMIN, headers={"Accept": "application/*"})
    assert definition.headers["Content-Type"] == "application/xml;charset=UTF-8" and definition.text == "<a/>"
    assert status(emulator, "GET", "/broker/request/0", ADMIN, headers={"Accept": "text/*"}) == 406
    options = call(emulator, "OPTIONS", "/broker/request/0", ADMIN)
    assert options.headers["Allow"] == "GET,PUT,DELETE,OPTIONS"
    assert options.text.startswith(DECL.decode() + f'<request xmlns="{NS}" id="0"><published>')
    # §4: deletion keeps status rows and results, ids are not reused
    actors.post_status(emulator.url, actors.NODE1_KEY, 0, "completed")
    actors.put_result(emulator.url, actors.NODE1_KEY, 0, b"r")
    assert status(emulator, "DELETE", "/broker/request/0", ADMIN) == 204
    assert status(emulator, "DELETE", "/broker/request/0", ADMIN) == 204
    assert status(emulator, "DELETE", "/broker/request/77", ADMIN) == 204
    assert status(emulator, "DELETE", "/broker/request/abc", ADMIN) == 400
    empty = DECL + f'<request-list xmlns="{NS}"/>'.encode()
    assert call(emulator, "GET", "/broker/request", ADMIN).content == empty
    assert filtered_ids(emulator, "true()", "application/xml") == []
    assert status(emulator, "GET", "/broker/request/0", ADMIN) == 404
    assert status(emulator, "OPTIONS", "/broker/request/0", ADMIN) == 404
    assert status(emulator, "POST", "/broker/request/0/publish", ADMIN) == 404
    assert actors.count_requests(emulator.url, actors.NODE1_KEY) == 0
    assert completion(status_xml(emulator, 0)) == "1.0"
    assert b"<node>0</node>" in call(emulator, "GET", "/aggregator/request/0/result", ADMIN).content
    assert actors.create_request(emulator.url, "rki") == 2


def test_node_view_of_requests(emulator):
    for tag in ("a", "b", "c"):
        actors.create_request(emulator.url, tag)
    actors.create_request(emulator.url, "unpublished", publish=False)
    call(emulator, "POST", "/broker/request/2/close", ADMIN)
    actors.post_status(emulator.url, actors.NODE1_KEY, 1, "retrieved")
    listing = actors.node_list_requests(emulator.url, actors.NODE1_KEY).decode()
    assert [child.get("id") for child in ET.fromstring(listing)] == ["0", "1"]
    assert re.search(
        f"<node-status><node>0</node><retrieved>{MILLIS}</retrieved></node-status></request></request-list>$",
        listing,
    )
    assert listing.count("node-status") == 2  # open + close tag, only for request 1
    assert status(emulator, "DELETE", "/broker/my/request/1", NODE1) == 204
    assert status(emulator, "DELETE", "/broker/my/request/1", NODE1) == 404
    assert status(emulator, "DELETE", "/broker/my/request/9", NODE1) == 404
    assert actors.count_requests(emulator.url, actors.NODE1_KEY) == 1
    assert b"<deleted>" in status_xml(emulator, 1)
    node_definition = call(emulator, "GET", "/broker/my/request/3", NODE1)  # unpublished, still readable
    assert node_definition.status_code == 200 and b"<tag>unpublished</tag>" in node_definition.content


def test_status_accumulation(emulator):
    path = "/broker/my/request/0/status/"
    for word in ("interaction", "retrieved", "interaction", "processing", "completed", "failed"):
        assert status(emulator, "POST", path + word, NODE1) == 204
    info = ET.fromstring(status_xml(emulator, 0))[0]
    assert [child.tag.split("}")[1] for child in info] == [
        "node",
        "retrieved",
        "processing",
        "completed",
        "failed",
    ]
    assert status(emulator, "POST", path + "interaction", NODE1) == 204
    assert ET.fromstring(status_xml(emulator, 0))[0][-1].tag == f"{{{NS}}}interaction"
    assert status(emulator, "POST", path + "expired", NODE1) == 500
    assert status(emulator, "POST", path + "Completed", NODE1) == 404
    assert status(emulator, "POST", path + "deleted", NODE1) == 404
    assert status(emulator, "POST", "/broker/my/request/x/status/completed", NODE1) == 404
    dated = {"Date": "Wed, 01 May 2024 10:15:30 GMT"}
    assert status(emulator, "POST", path + "queued", NODE1, headers=dated) == 204
    assert b"<queued>2024-05-01T10:15:30Z</queued>" in status_xml(emulator, 0)


# ------------------------------------------------------------------------------------- §3.7 filtered


def test_filtered_validation(emulator):
    assert filtered(emulator, "true()", None).status_code == 400
    assert filtered(emulator, "true()", "text/plain").status_code == 400
    assert filtered(emulator, "true()", "application/XML").status_code == 400
    assert filtered(emulator, None).status_code == 500
    for predicate in ("//tag='", "", "foo()", "concat('a')", "x:f()", "//tag[", "1 +"):
        assert filtered(emulator, predicate).status_code == 400, predicate
    for predicate in ("//a:tag='x'", "$v", "not(//tag)", "//tag and count(//tag) > 1 or //*[name()='div']"):
        assert filtered(emulator, predicate).status_code == 200, predicate


def test_filtered_matching_is_namespace_unaware(emulator):
    create(emulator, actors.request_body("rki"), QUERY_TYPE)  # 0
    create(emulator, '<a:q xmlns:a="urn:a"><a:tag>rki</a:tag></a:q>', QUERY_TYPE)  # 1
    create(emulator, "<q><tag>rki", QUERY_TYPE)  # 2 unparseable: skipped
    create(emulator, "<q><tag> rki </tag><tag>true</tag></q>", QUERY_TYPE)  # 3
    create(emulator, "<q><tag>rki</tag></q>", "application/xml")  # 4 other type
    assert filtered_ids(emulator, "//tag='rki'") == ["0"]
    assert filtered_ids(emulator, "/queryRequest/query/principal/tags/tag='rki'") == ["0"]
    assert filtered_ids(emulator, "queryRequest/query/principal/tags/tag='rki'") == ["0"]  # document context
    assert filtered_ids(emulator, "//a:tag='rki'") == []
    assert filtered_ids(emulator, "//*[local-name()='tag']='rki'") == ["0", "1"]
    assert filtered_ids(emulator, "//*[name()='a:tag']='rki'") == ["1"]
    assert filtered_ids(emulator, "true()") == ["0", "1", "3"]
    assert filtered_ids(emulator, "count(//tag)") == []
    assert filtered_ids(emulator, "//tag[2]") == ["3"]  # node set: string value of the first node
    assert filtered_ids(emulator, "//tag") == []
    assert filtered_ids(emulator, "//tag='rki'", "application/xml") == ["4"]


# ---------------------------------------------------------------------------------------- test hooks


def test_fault_status_and_log(emulator):
    emulator.inject_fault("GET", r"/broker/request/filtered$", status=503, times=2)
    emulator.inject_fault("POST", r"^/broker/request$", status=500)
    statuses = [filtered(emulator, "true()").status_code for _ in range(3)]
    assert statuses == [503, 503, 200]
    xml = {"Content-Type": "application/xml"}
    assert status(emulator, "POST", "/broker/request", ADMIN, data="<a/>", headers=xml) == 500
    assert create(emulator, "<a/>") == 0  # the faulted call changed nothing
    emulator.inject_fault("*", "status", status=418, times=5)
    emulator.clear_faults()
    assert status(emulator, "GET", "/broker/status") == 200
    method, path, query, headers = emulator.requests_log[0]
    assert (method, path) == ("GET", "/broker/request/filtered")
    assert "predicate=true%28%29" in query
    assert headers["authorization"] == f"Bearer {actors.ADMIN_KEY}" and headers["Accept"] == "application/xml"
    assert len(emulator.requests_log) == 6
    emulator.requests_log.clear()
    assert emulator.requests_log == []
    with pytest.raises(ValueError):
        emulator.inject_fault("GET", "x")


def test_fault_truncate_and_delay(emulator):
    actors.create_request(emulator.url, "rki")
    token = export(emulator, 0)
    size = len(download(emulator, token).content)
    emulator.inject_fault("GET", "/broker/download/", truncate_after=100)
    connection = http.client.HTTPConnection("127.0.0.1", emulator.port, timeout=10)
    connection.request("GET", f"/broker/download/{token}")
    response = connection.getresponse()
    assert int(response.getheader("Content-Length")) == size
    with pytest.raises(http.client.IncompleteRead) as caught:
        response.read()
    assert len(caught.value.partial) == 100
    connection.close()
    assert len(download(emulator, token).content) == size  # only once
    emulator.inject_fault("HEAD", "^/broker/status$", delay=0.3)
    started = time.monotonic()
    assert status(emulator, "HEAD", "/broker/status") == 200
    assert time.monotonic() - started >= 0.3


def test_keep_alive_and_unread_bodies(emulator):
    connection = http.client.HTTPConnection("127.0.0.1", emulator.port, timeout=10)
    for method, path, body, headers, expected in [
        ("PUT", "/aggregator/my/request/0/result", b"x" * 300_000, CSV, 401),
        ("POST", "/broker/request", b"<a/>", {**ADMIN, "Content-Type": "application/xml"}, 201),
        ("GET", "/broker/request", None, ADMIN, 200),
        ("POST", "/broker/request/0/publish", None, ADMIN, 204),
        ("GET", "/nowhere", b"ignored", {}, 404),
        ("HEAD", "/broker/status", None, {}, 200),
        ("GET", "/broker/status", None, {}, 200),
    ]:
        connection.request(method, path, body=body, headers=headers)
        response = connection.getresponse()
        response.read()
        assert response.status == expected, path
        assert not response.will_close
    connection.close()


def test_chunked_result_upload(emulator):
    pieces = [b"line %d\n" % n for n in range(1000)]
    response = call(
        emulator,
        "PUT",
        "/aggregator/my/request/5/result",
        NODE1,
        data=iter(pieces),
        headers={"Content-Type": "text/csv; charset=UTF-8"},
    )
    assert response.status_code == 204
    stored = call(emulator, "GET", "/aggregator/request/5/result/0", ADMIN)
    assert stored.content == b"".join(pieces)
    assert stored.headers["Content-Type"] == "text/csv;charset=UTF-8"


def test_large_result_is_streamed(emulator, tmp_path):
    source = tmp_path / "big.csv"
    digest = hashlib.sha256()
    block = b"".join(
        b"%d;patient-%d;%d;2024-01-01\n" % (n, n * 7919 % 100_003, n % 97) for n in range(30_000)
    )
    with source.open("wb") as out:
        while out.tell() < 64 * 1024 * 1024:
            piece = b"%012d\n" % out.tell() + block
            out.write(piece)
            digest.update(piece)
    actors.create_request(emulator.url, "rki")
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    actors.put_result(emulator.url, actors.NODE1_KEY, 0, source)
    target = tmp_path / "bundle.zip"
    with requests.get(
        f"{emulator.url}/broker/download/{export(emulator, 0)}", stream=True, timeout=60
    ) as response:
        assert int(response.headers["Content-Length"]) > 0
        with target.open("wb") as out:
            for chunk in response.iter_content(1024 * 1024):
                out.write(chunk)
    grown_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before
    check = hashlib.sha256()
    with zipfile.ZipFile(target) as archive, archive.open("0_result.txt") as entry:
        for chunk in iter(lambda: entry.read(1024 * 1024), b""):
            check.update(chunk)
        assert archive.getinfo("0_result.txt").file_size == source.stat().st_size
    assert check.hexdigest() == digest.hexdigest()
    assert grown_kib < 40 * 1024, f"max RSS grew by {grown_kib} KiB while streaming 64 MiB"


# ----------------------------------------------------------------------------------------- processes


def test_standalone_process(tmp_path):
    port_file = tmp_path / "port"
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "test_resources.broker_emulator",
            "--port-file",
            str(port_file),
            "--data-dir",
            str(tmp_path / "data"),
        ],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 15
        while not port_file.exists():
            assert process.poll() is None, process.stderr.read()
            assert time.monotonic() < deadline, "no port file"
            time.sleep(0.05)
        port = int(port_file.read_text())
        assert process.stdout.readline() == f"broker emulator listening on http://127.0.0.1:{port}\n"
        assert requests.head(f"http://127.0.0.1:{port}/broker/status", timeout=10).status_code == 200
        assert actors.main([f"http://127.0.0.1:{port}", "create", "rki"]) == 0
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=10) == 0
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
        process.stdout.close()
        process.stderr.close()


def test_actors_cli(emulator, capsys):
    url = emulator.url
    assert actors.main([url, "create", "rki"]) == 0
    assert capsys.readouterr().out == "0\n"
    assert actors.main([url, "count-requests", actors.NODE1_KEY]) == 0
    assert capsys.readouterr().out == "1\n"
    assert actors.main([url, "put-result", actors.NODE1_KEY, "0", "a;b\\n1;2"]) == 0
    assert actors.main([url, "post-status", actors.NODE1_KEY, "0", "completed"]) == 0
    assert actors.main([url, "post-status", actors.NODE1_KEY, "0", "bogus"]) == 1
    assert "404" in capsys.readouterr().err
    assert actors.main([url, "delete", "0"]) == 0
    assert actors.main([url, "count-nodes"]) == 0
    assert capsys.readouterr().out == "1\n"
    assert status(emulator, "POST", "/broker/export/request-bundle/0", ADMIN) == 500  # deleted
    result = subprocess.run(
        [sys.executable, "-m", "test_resources.broker_actors", url, "count-requests", "bad"],
        check=False,
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 1 and "401" in result.stderr
