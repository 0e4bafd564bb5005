"""Unit tests for the broker client's pure parts: completion, ids, remote names."""

import pytest

from broker_sftp_uploader.broker import (
    format_completion,
    parse_completion,
    parse_request_ids,
    safe_remote_name,
)
from broker_sftp_uploader.errors import BrokerError

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


@pytest.mark.parametrize("header,expected", [
    ('inline; filename="export_2.zip"', "export_2.zip"),
    ("attachment; filename=export_2.zip", "export_2.zip"),
    ('inline; filename="../../etc/passwd"', "passwd"),
    ('inline; filename="..\\\\evil.zip"', "evil.zip"),
    ('inline; filename="/abs/path/x.zip"', "x.zip"),
    ('inline; filename=".hidden"', "export_7.zip"),
    ('inline; filename=".."', "export_7.zip"),
    ('inline; filename=""', "export_7.zip"),
    ('inline; filename="status.xml"', "export_7.zip"),
    ('inline; filename="a b.zip"', "export_7.zip"),
    ('inline; filename="x\x00.zip"', "export_7.zip"),
    ('inline; filename="' + "a" * 300 + '"', "export_7.zip"),
    (None, "export_7.zip"),
    ("inline", "export_7.zip"),
])
def test_safe_remote_name_keeps_only_safe_base_names(header, expected):
    assert safe_remote_name(header, "7") == expected
