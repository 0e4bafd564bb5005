"""Unit tests for the journal of remote temp names in flight (real files)."""

from broker_sftp_uploader.state.journal import PartialsJournal


def test_leftovers_are_only_what_earlier_runs_left(tmp_path):
    path = tmp_path / "status.xml.partials"
    path.write_text("+.export_1.zip.part-000000000001\n+.export_2.zip.part-000000000002\n"
                    "-.export_2.zip.part-000000000002\n+../evil.part-000000000003\n")
    journal = PartialsJournal(path)
    assert journal.leftovers() == [".export_1.zip.part-000000000001"]
    journal.add(".export_7.zip.part-000000000007")  # this run's upload in flight: not a leftover
    assert journal.leftovers() == [".export_1.zip.part-000000000001"]
    assert ".export_7.zip.part-000000000007" in PartialsJournal(path).leftovers()  # for the next run it is
    journal.discard(".export_1.zip.part-000000000001")
    journal.discard(".export_7.zip.part-000000000007")
    assert journal.leftovers() == [] and not path.exists()


def test_journal_survives_a_crash_between_add_and_discard(tmp_path):
    path = tmp_path / "status.xml.partials"
    first = PartialsJournal(path)
    first.add(".export_3.zip.part-00000000000a")
    first.add(".export_4.zip.part-00000000000b")
    first.discard(".export_3.zip.part-00000000000a")
    # the process dies here: no close, no clean-up
    assert PartialsJournal(path).leftovers() == [".export_4.zip.part-00000000000b"]
