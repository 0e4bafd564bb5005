"""The SFTP server: ``connection`` (paramiko login, host keys, parallel sessions), ``session`` (one SFTP
channel: atomic uploads, removals), ``openssh`` (the same over ``ssh`` children), ``ssh_keys`` (known_hosts,
private keys), ``readonly_login`` (a login that records nothing), ``transport`` (which of the two) and
``paramiko_internals`` (the only module that uses paramiko's private API)."""
