"""The instance lock and the image lock: a verification (the image lock, shared) holds off what
changes images but not a load or unload of the same instance; two verifications share it."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

import pytest

from kvc.errors import BusyError, ExitCode
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
        with pytest.raises(BusyError) as busy, instance_lock(locks, "demo", timeout=0.3):
            pass
        assert busy.value.brief.startswith("the images of demo are in use by another kvc run")
        assert busy.value.exit_code == ExitCode.BUSY
    with instance_lock(locks, "demo", timeout=0.2):
        with pytest.raises(BusyError) as changing, images_in_use(locks, "demo", timeout=0.2):
            pass
        assert changing.value.brief.startswith("the images of demo are being changed by another kvc run")
        with pytest.raises(BusyError) as held, instance_lock(locks, "demo", images=False, timeout=0.2):
            pass
        assert held.value.brief == "instance demo is locked by another kvc run"
    with instance_lock(locks, "other", timeout=0.2), images_in_use(locks, "demo", timeout=0.2):
        pass


Kvc = Callable[..., "subprocess.CompletedProcess[str]"]


@pytest.fixture
def demo_host(tmp_path: Path) -> tuple[Path, FakeKernel, Kvc]:
    """A KVC_ROOT with the fake kernel and an instance ``demo`` of one module, loaded from
    ``--modules-dir``; returns the root, the kernel and a runner of kvc (extra environment as keywords)."""
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
    modules = str(tmp_path / "modules")

    def kvc(*argv: str, **extra_env: str) -> subprocess.CompletedProcess[str]:
        env = {**os.environ, "KVC_ROOT": str(root), "KVC_KERNEL": "fake", **extra_env}
        if argv[0] == "load":
            argv = (*argv, "--modules-dir", modules)
        return subprocess.run(
            [sys.executable, "-m", "kvc", *argv], capture_output=True, text=True, env=env, check=False, timeout=60
        )

    return root, kernel, kvc


def test_load_and_unload_run_while_a_verification_holds_the_images(demo_host: tuple[Path, FakeKernel, Kvc]) -> None:
    root, kernel, kvc = demo_host
    with images_in_use(str(root / "run/kvc"), "demo"):
        loaded = kvc("load", "demo")
        assert loaded.returncode == 0, loaded.stderr
        assert [m.name for m in kernel.loaded_modules()] == ["demo_mod"]
        unloaded = kvc("unload", "demo")
        assert unloaded.returncode == 0, unloaded.stderr
        assert kernel.loaded_modules() == []


def test_a_command_that_waited_KVC_LOCK_TIMEOUT_exits_busy_having_done_nothing(
    demo_host: tuple[Path, FakeKernel, Kvc],
) -> None:
    root, kernel, kvc = demo_host
    with instance_lock(str(root / "run/kvc"), "demo"):
        started = time.monotonic()
        busy = kvc("load", "demo", KVC_LOCK_TIMEOUT="0.5")
        waited = time.monotonic() - started
        assert busy.returncode == 11 and ExitCode(busy.returncode) is ExitCode.BUSY, busy.stderr
        assert busy.stderr.splitlines() == [
            "kvc: error: instance demo is locked by another kvc run",
            f"  lock file: {root}/run/kvc/demo.lock",
            "kvc: hint: run it again when the other run is done (KVC_LOCK_TIMEOUT sets how long kvc waits)",
        ]
        assert 0.5 <= waited < 10
        assert kernel.loaded_modules() == []
        assert kvc("status", "demo").returncode == 0  # readers take no lock
    assert kvc("load", "demo", KVC_LOCK_TIMEOUT="0").returncode == 0
    assert [m.name for m in kernel.loaded_modules()] == ["demo_mod"]


@pytest.mark.parametrize("value", ["soon", "-1", "inf", "nan", "\u0661"])
def test_a_bad_KVC_LOCK_TIMEOUT_is_a_config_error(demo_host: tuple[Path, FakeKernel, Kvc], value: str) -> None:
    _, kernel, kvc = demo_host
    done = kvc("load", "demo", KVC_LOCK_TIMEOUT=value)
    assert done.returncode == ExitCode.CONFIG, done.stderr
    assert done.stderr.splitlines()[0] == f"kvc: error: KVC_LOCK_TIMEOUT={value!r} is not a number of seconds"
    assert kernel.loaded_modules() == []
