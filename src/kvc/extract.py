"""The instance's modules, extracted from its image into ``/var/lib/kvc/NAME/KVER`` for loading.

Extraction is atomic: files go to a temporary directory beside the target with a manifest of
their digests, then the directory is swapped in by rename. It is redone only when the image
changed, and loaders check the files against the manifest before use.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from typing import Optional

from kvc.build import LABEL_DIGEST, find_modules
from kvc.config import InstanceConfig
from kvc.errors import StateError
from kvc.kmod.module import ModuleFile
from kvc.layout import Layout
from kvc.runtime import ContainerRuntime

MANIFEST = "manifest.json"
SCHEMA = 1


@dataclass(frozen=True)
class ExtractedModule:
    name: str
    file: str  # relative to the extraction directory
    sha256: str
    vermagic: str
    depends: tuple[str, ...]


@dataclass(frozen=True)
class Manifest:
    directory: str
    image: str
    image_id: str
    image_digest: str
    kernel: str
    modules: tuple[ExtractedModule, ...]

    def path_of(self, name: str) -> str:
        for module in self.modules:
            if module.name == name:
                return os.path.join(self.directory, module.file)
        raise KeyError(name)

    def verify(self) -> None:
        """The files still are what was extracted."""
        for module in self.modules:
            path = os.path.join(self.directory, module.file)
            if not os.path.exists(path) or _sha256(path) != module.sha256:
                raise StateError(f"{path} changed since it was extracted",
                                 hint="run the load again with --force to re-extract")


def _sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def read_manifest(layout: Layout, name: str, kernel_release: str) -> Optional[Manifest]:
    directory = layout.kernel_state(name, kernel_release)
    try:
        with open(os.path.join(directory, MANIFEST), encoding="utf-8") as handle:
            data = json.load(handle)
        if data.get("schema") != SCHEMA:
            return None
        return Manifest(directory, data["image"], data["image_id"], data.get("image_digest", ""), data["kernel"],
                        tuple(ExtractedModule(m["name"], m["file"], m["sha256"], m["vermagic"], tuple(m["depends"]))
                              for m in data["modules"]))
    except (OSError, ValueError, KeyError, TypeError):
        return None


def extract(layout: Layout, instance: InstanceConfig, kernel_release: str, runtime: ContainerRuntime,
            image: str, *, force: bool = False) -> Manifest:
    info = runtime.inspect(image)
    if info is None:
        raise StateError(f"image {image} does not exist", hint=f"run 'kvc build {instance.name} --kernel "
                                                                f"{kernel_release}' first")
    current = read_manifest(layout, instance.name, kernel_release)
    if current is not None and current.image_id == info.id and not force:
        return current
    target = layout.kernel_state(instance.name, kernel_release)
    parent = os.path.dirname(target)
    os.makedirs(parent, exist_ok=True)
    staging = tempfile.mkdtemp(prefix=f".{kernel_release}.new-", dir=parent)
    try:
        found = find_modules(runtime, image, kernel_release, instance.module_names)
        runtime.copy_out(image, list(found.values()), staging)
        modules = []
        for name in (n.replace("-", "_") for n in instance.module_names):
            if name not in found:
                raise StateError(f"image {image} has no module {name}", hint="rebuild with 'kvc build --force'")
            file = os.path.basename(found[name])
            module = ModuleFile.open(os.path.join(staging, file))
            modules.append(ExtractedModule(name, file, _sha256(os.path.join(staging, file)),
                                           module.vermagic or "", tuple(module.depends)))
        manifest = {"schema": SCHEMA, "image": image, "image_id": info.id,
                    "image_digest": info.labels.get(LABEL_DIGEST, ""), "kernel": kernel_release,
                    "modules": [m.__dict__ | {"depends": list(m.depends)} for m in modules]}
        with open(os.path.join(staging, MANIFEST), "w", encoding="utf-8") as handle:
            json.dump(manifest, handle, indent=2)
            handle.write("\n")
            handle.flush()
            os.fsync(handle.fileno())
        for entry in os.listdir(staging):
            os.chmod(os.path.join(staging, entry), 0o644)
        os.chmod(staging, 0o755)
        old = None
        if os.path.exists(target):
            old = tempfile.mkdtemp(prefix=f".{kernel_release}.old-", dir=parent)
            os.rename(target, os.path.join(old, "x"))
        os.rename(staging, target)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    result = read_manifest(layout, instance.name, kernel_release)
    assert result is not None
    return result
