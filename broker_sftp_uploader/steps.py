"""Steps the commands share: opening the broker client and the SFTP connection a config describes.

``sync`` (job.py), ``check`` (preflight.py) and ``status`` (status_view.py) all go through these, so
the three talk to the broker and the server the same way.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from broker_sftp_uploader.broker import BrokerClient
from broker_sftp_uploader.config import Config
from broker_sftp_uploader.journal import PartialsJournal

if TYPE_CHECKING:
    from broker_sftp_uploader.sftp import SftpConnection


def broker_client(config: Config, deadline: float) -> BrokerClient:
    """The broker client for ``config``, no call running past ``deadline`` (a ``time.monotonic()`` value)."""
    settings = config.broker
    return BrokerClient(settings.url, settings.api_key, ca_bundle=settings.ca_bundle,
                        call_timeout=settings.call_timeout, export_timeout=settings.export_timeout,
                        retries=settings.retries, run_deadline=deadline, concurrency=settings.concurrency)


def sftp_connection(config: Config, journal: PartialsJournal | None, deadline: float) -> SftpConnection:
    """The SFTP connection (not yet open). paramiko costs a tenth of a second to import, so only a run
    that may connect imports it."""
    if config.sftp.transport == "openssh":
        from broker_sftp_uploader.openssh import OpensshConnection

        return OpensshConnection(config.sftp, journal, deadline)
    from broker_sftp_uploader.sftp import SftpConnection

    return SftpConnection(config.sftp, journal, deadline)
