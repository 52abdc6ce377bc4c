"""The instance lock and the image lock: a verification (the image lock, shared) holds off what
changes images but not a load or unload of the same instance; two verifications share it."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from kvc.errors import ExitCode, StateError
from kvc.kmod.kernel.fake import FakeKernel
from kvc.kmod.paths import HostPaths
from kvc.lock import images_in_use, instance_lock
from support.modbuild import ModuleSpec, build_module

RELEASE = "6.1.0-99-amd64"


def test_a_verification_holds_off_image_changes_but_not_the_instance_lock(tmp_path: Path) -> None:
    locks = str(tmp_path / "run")
    with images_in_use(locks, "demo"), images_in_use(locks, "demo", timeout=0.2):
        with instance_lock(locks, "demo", images=False, timeout=0.2):
            pass
        with pytest.raises(StateError) as busy, instance_lock(locks, "demo", timeout=0.3):
            pass
        assert busy.value.brief.startswith("the images of demo are in use by another kvc run")
        assert busy.value.exit_code == ExitCode.STATE
    with instance_lock(locks, "demo", timeout=0.2):
        with pytest.raises(StateError) as changing, images_in_use(locks, "demo", timeout=0.2):
            pass
        assert changing.value.brief.startswith("the images of demo are being changed by another kvc run")
        with pytest.raises(StateError) as held, instance_lock(locks, "demo", images=False, timeout=0.2):
            pass
        assert held.value.brief == "instance demo is locked by another kvc run"
    with instance_lock(locks, "other", timeout=0.2), images_in_use(locks, "demo", timeout=0.2):
        pass


def test_load_and_unload_run_while_a_verification_holds_the_images(tmp_path: Path) -> None:
    root = tmp_path / "root"
    kernel = FakeKernel.create(HostPaths(str(root)), RELEASE)
    (root / "etc/kvc").mkdir(parents=True)
    (root / "etc/kvc/demo.conf").write_text(
        'KMOD_CONTAINER_BUILD_CONTEXT=/nonexistent\nKMOD_SOFTWARE_VERSION=1\nKMOD_NAMES="demo_mod"\n'
    )
    target = tmp_path / "modules/lib/modules" / RELEASE / "extra"
    target.mkdir(parents=True)
    spec = ModuleSpec(name="demo_mod", vermagic=f"{RELEASE} SMP preempt mod_unload modversions ", imports=[])
    (target / "demo_mod.ko").write_bytes(build_module(spec))
    env = {**os.environ, "KVC_ROOT": str(root), "KVC_KERNEL": "fake"}

    def kvc(*argv: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "kvc", *argv], capture_output=True, text=True, env=env, check=False, timeout=60
        )

    with images_in_use(str(root / "run/kvc"), "demo"):
        loaded = kvc("load", "demo", "--modules-dir", str(tmp_path / "modules"))
        assert loaded.returncode == 0, loaded.stderr
        assert [m.name for m in kernel.loaded_modules()] == ["demo_mod"]
        unloaded = kvc("unload", "demo")
        assert unloaded.returncode == 0, unloaded.stderr
        assert kernel.loaded_modules() == []
