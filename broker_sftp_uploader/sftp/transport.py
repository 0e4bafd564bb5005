"""The SFTP transport a config names: paramiko in this process (default) or OpenSSH's ``ssh`` children.

``sync``, ``check`` and ``status --remote`` all open their connection here, so the three talk to the
server the same way.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from broker_sftp_uploader.config import Config
from broker_sftp_uploader.state.journal import PartialsJournal

if TYPE_CHECKING:
    from broker_sftp_uploader.sftp.connection import SftpConnection


def sftp_connection(config: Config, journal: PartialsJournal | None, deadline: float) -> SftpConnection:
    """The SFTP connection (not yet open). paramiko costs a tenth of a second to import, so only a run
    that may connect imports it."""
    if config.sftp.transport == "openssh":
        from broker_sftp_uploader.sftp.openssh import OpensshConnection

        return OpensshConnection(config.sftp, journal, deadline)
    from broker_sftp_uploader.sftp.connection import SftpConnection

    return SftpConnection(config.sftp, journal, deadline)
