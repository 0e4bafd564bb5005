"""Entry point for ``python -m broker_sftp_uploader``."""

from broker_sftp_uploader.cli import main

if __name__ == "__main__":
    main()
