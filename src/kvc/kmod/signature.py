"""Placeholder: replaced by the signature reader."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional


@dataclass(frozen=True)
class ModuleSignature:
    id_type: str
    signer: str
    key_id: bytes
    hash_algo: str
    signature: bytes


def read_signature(image: bytes, path: str) -> Optional[ModuleSignature]:
    return None
