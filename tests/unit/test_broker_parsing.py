"""Unit tests for the broker documents' parsing: completion, ids, limits; and the remote file names."""

import pytest

from broker_sftp_uploader.broker import documents as broker_documents
from broker_sftp_uploader.broker.documents import (
    format_completion,
    parse_completion,
    parse_request_ids,
)
from broker_sftp_uploader.errors import BrokerError
from broker_sftp_uploader.state.ledger import default_file_name

DECL = b'<?xml version="1.0" encoding="UTF-8" standalone="yes"?>'
NS = b'xmlns="http://aktin.org/ns/exchange"'


@pytest.mark.parametrize("completed,total,expected", [
    (0, 0, "0.0"), (0, 1, "0.0"), (1, 1, "1.0"), (1, 2, "0.5"), (1, 3, "0.33"), (2, 3, "0.67"),
    (5, 6, "0.83"), (3, 3, "1.0"),
])
def test_format_completion_matches_original_strings(completed, total, expected):
    assert format_completion(completed, total) == expected


def test_parse_completion_counts_rows_and_completed():
    document = (DECL + b"<request-status-list " + NS + b"><request-status-info><node>0</node>"
                b"<retrieved>2024-05-02T10:15:30.123Z</retrieved><completed>2024-05-02T10:16:00Z</completed>"
                b"</request-status-info><request-status-info><node>1</node>"
                b"<retrieved>2024-05-02T10:17:12.5Z</retrieved></request-status-info></request-status-list>")
    assert parse_completion(document) == "0.5"


def test_parse_completion_empty_list_is_zero():
    assert parse_completion(DECL + b"<request-status-list " + NS + b"/>") == "0.0"


def test_parse_completion_ignores_elements_outside_the_namespace():
    document = b"<request-status-list><request-status-info><node>0</node><completed>x</completed>" \
               b"</request-status-info></request-status-list>"
    assert parse_completion(document) == "0.0"


def test_parse_completion_rejects_non_xml():
    with pytest.raises(BrokerError, match="not XML"):
        parse_completion(b"<html>500</html")


def test_parse_completion_does_not_expand_entities():
    document = (b'<!DOCTYPE r [<!ENTITY e SYSTEM "file:///etc/passwd">]>'
                b"<request-status-list " + NS + b"><request-status-info><node>&e;</node>"
                b"</request-status-info></request-status-list>")
    assert parse_completion(document) == "0.0"


def test_parse_request_ids_reads_id_attributes_in_order():
    document = (DECL + b"<request-list " + NS + b'><request id="2"><published>2024-05-02T10:15:30.123456Z'
                b'</published><targeted>false</targeted></request><request id="4"><targeted>false</targeted>'
                b"</request></request-list>")
    assert parse_request_ids(document) == ["2", "4"]


def test_parse_request_ids_empty_list():
    assert parse_request_ids(DECL + b"<request-list " + NS + b"/>") == []


@pytest.mark.parametrize("bad", [b"../../etc", b"", b"2 OR 1", b"-1"])
def test_parse_request_ids_rejects_hostile_ids(bad):
    with pytest.raises(BrokerError, match="invalid id"):
        parse_request_ids(b"<request-list " + NS + b'><request id="' + bad + b'"/></request-list>')


def test_parse_request_ids_rejects_other_documents():
    with pytest.raises(BrokerError, match="request-list"):
        parse_request_ids(b"<status/>")


def test_parse_request_ids_rejects_a_request_listed_twice():
    with pytest.raises(BrokerError, match="listed request 3 twice"):
        parse_request_ids(b"<request-list " + NS + b'><request id="3"/><request id="03"/></request-list>')


def test_parse_request_ids_keeps_memory_flat_on_a_large_listing():
    # 50,000 requests with bulky children: the parser drops each element as soon as it ends.
    body = b"".join(b'<request id="%d"><published>2024-05-02T10:15:30Z</published><targeted>false</targeted>'
                    b"</request>" % number for number in range(50_000))
    ids = parse_request_ids(b"<request-list " + NS + b">" + body + b"</request-list>")
    assert len(ids) == 50_000 and ids[-1] == "49999"


def test_parse_request_ids_refuses_a_document_with_too_many_requests(monkeypatch):
    monkeypatch.setattr(broker_documents, "MAX_LISTED_REQUESTS", 3)
    document = b"<request-list " + NS + b">" + b"".join(b'<request id="%d"/>' % n for n in range(4)) + \
        b"</request-list>"
    with pytest.raises(BrokerError, match="more than 3 requests"):
        parse_request_ids(document)


def test_parse_completion_refuses_deep_nesting():
    document = b"<request-status-list " + NS + b">" + b"<a>" * 100_000 + b"</a>" * 100_000 + \
        b"</request-status-list>"
    with pytest.raises(BrokerError, match="not XML"):
        parse_completion(document)


@pytest.mark.parametrize("request_id", ["0", "7", "123456"])
def test_default_file_name_is_the_brokers_convention(request_id):
    assert default_file_name(request_id) == f"export_{request_id}.zip"
