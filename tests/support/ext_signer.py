"""An external module signer for kvc's KVC_SIGN_COMMAND protocol: ``ext_signer.py KEYFILE HASH``
reads the bytes to sign on stdin and writes the raw RSA PKCS#1 v1.5 signature on stdout."""

import sys

from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding


def main() -> int:
    key_path, hash_name = sys.argv[1], sys.argv[-1]
    with open(key_path, "rb") as handle:
        key = serialization.load_pem_private_key(handle.read(), password=None)
    digest: hashes.HashAlgorithm = {"sha256": hashes.SHA256(), "sha384": hashes.SHA384(), "sha512": hashes.SHA512()}[
        hash_name
    ]
    sys.stdout.buffer.write(key.sign(sys.stdin.buffer.read(), padding.PKCS1v15(), digest))  # type: ignore[union-attr,call-arg,arg-type]
    return 0


if __name__ == "__main__":
    sys.exit(main())
