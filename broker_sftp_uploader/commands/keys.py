"""The key commands: ``keygen`` (a new Fernet key file), ``fingerprint`` (of each key in a file) and
``decrypt`` (the receiver's side: files made by ``sync`` back to their plaintext)."""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import BinaryIO

from broker_sftp_uploader.crypto import (
    decrypt_file,
    decrypt_to_stream,
    generate_key_file,
    key_fingerprint,
    load_keys,
    make_output_dir,
    output_path_for,
)
from broker_sftp_uploader.errors import EXIT_KEY, EXIT_OK, UploaderError

logger = logging.getLogger(__name__)


def keygen(path: Path) -> str:
    """Write a new key to ``path`` (0600, never over an existing file); return its fingerprint."""
    return generate_key_file(path)


def fingerprints(key_file: Path) -> list[str]:
    """The fingerprint of every key in ``key_file``, in file order (the first is the one sync uses)."""
    return [key_fingerprint(key) for key in load_keys(key_file)]


def decrypt(key_files: Sequence[Path], files: Sequence[Path], *, output: Path | None, output_dir: Path | None,
            force: bool, stdout: BinaryIO, report: Callable[[UploaderError], None]) -> int:
    """Decrypt each of ``files`` with the keys of ``key_files``; return the exit code.

    ``output`` names the one output file (``-``: ``stdout``); ``output_dir`` a folder for them all;
    neither: beside each input. A file that fails is passed to ``report`` and the others are still done;
    a file that does not decrypt (12) matters more than an output in the way (16).
    """
    keys = [key for key_file in key_files for key in load_keys(key_file)]
    if output is not None and str(output) == "-":
        decrypt_to_stream(keys, files[0], stdout)
        return EXIT_OK
    if output_dir is not None:
        make_output_dir(output_dir)
    codes = []
    for source in files:
        target = output if output is not None else output_path_for(source, output_dir)
        try:
            decrypt_file(keys, source, target, overwrite=force)
        except UploaderError as error:
            codes.append(error.exit_code)
            report(error)
            continue
        logger.info("decrypted %s to %s", source, target)
    if not codes:
        return EXIT_OK
    return EXIT_KEY if EXIT_KEY in codes else codes[0]
