"""``sign-file``: the kernel's ``scripts/sign-file`` over :mod:`kvc.kmod.sign`.

``sign-file [-dp] [-k] HASH KEY X509 MODULE [DEST]`` appends a PKCS#7 module signature made with
the private key file KEY (PEM or DER) and its certificate X509 (PEM or DER) to MODULE, or writes
the signed module to DEST. ``-k`` names the signer by the certificate's subject key identifier
instead of its issuer and serial number; ``-p`` also writes the detached PKCS#7 to
``MODULE.p7s``; ``-d`` writes only that file and leaves MODULE alone.
``sign-file -s RAW HASH X509 MODULE [DEST]`` appends RAW, a DER PKCS#7 made elsewhere (such as a
``-d`` file), and like sign-file then reads neither HASH nor X509. The files written are
byte-identical to sign-file's. Exit status 0, 1 for a failure, 2 for a usage error, as
sign-file's. A compressed module is signed on its uncompressed bytes and compressed again.
"""

from __future__ import annotations

import getopt
import os
from pathlib import Path
from typing import Optional, Sequence

from kvc.kmod import compression
from kvc.kmod.atomic import write_file
from kvc.kmod.errors import KmodError
from kvc.kmod.sign import KeyFileSigner, pkcs7_trailer, signature_block
from kvc.kmod.tools._cli import run_tool, write_err

PROG = "sign-file"
USAGE = (
    "Usage: kvc kmod sign-file [-dp] [-k] <hash algo> <key> <x509> <module> [<dest>]\n"
    "       kvc kmod sign-file -s <raw sig> <hash algo> <x509> <module> [<dest>]\n"
)
_TRAILER_SIZE = 12 + 28  # struct module_signature and the magic


def _body(argv: list[str]) -> int:
    try:
        options, args = getopt.gnu_getopt(argv, "dpks:")
    except getopt.GetoptError as exc:
        write_err(f"{PROG}: invalid option -- '{exc.opt}'\n{USAGE}")
        return 2
    flags = {flag for flag, _ in options}
    raw_signature = dict(options).get("-s")
    if raw_signature is not None and args:
        # sign-file -s takes no key: keep the argument positions of the other form.
        args = [args[0], "", *args[1:]]
    if len(args) not in (4, 5):
        write_err(USAGE)
        return 2
    hash_name, key_path, cert_path, module_path = args[:4]
    detached_only = "-d" in flags
    save_detached = detached_only or "-p" in flags
    dest = args[4] if len(args) == 5 else module_path
    try:
        source = Path(module_path)
        if raw_signature is not None:
            message = Path(raw_signature).read_bytes()
            kind, plain = compression.decompress(source.read_bytes(), module_path)
            block = pkcs7_trailer(message)
        else:
            signer = KeyFileSigner(key_path, cert_path)
            kind, plain = compression.decompress(source.read_bytes(), module_path)
            block = signature_block(bytes(plain), signer, hash_name, key_id_from_skid="-k" in flags)
        if save_detached:
            write_file(f"{module_path}.p7s", block[:-_TRAILER_SIZE], 0o644)
        if detached_only:
            return 0
        signed = bytes(plain) + block
        if kind is not None:
            signed = compression.compress(kind, signed, dest)
        mode = os.stat(source).st_mode & 0o7777 if dest == module_path else 0o644
        write_file(dest, signed, mode)
    except KmodError as exc:
        write_err(f"{PROG}: {exc.brief}\n" + (f"  {exc.details}\n" if exc.details else ""))
        return 1
    except OSError as exc:
        write_err(f"{PROG}: {exc.filename}: {exc.strerror}\n")
        return 1
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    return run_tool(_body, argv)
