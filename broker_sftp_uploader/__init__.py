"""broker-sftp-uploader: deliver tagged AKTIN broker results, encrypted, to an SFTP server."""

__version__ = "0.1.0"
