"""Inputs scripts/fuzz.py found crashing kvc.kmod, rebuilt from small synthetic ones: each must end
in the reader's documented outcome (an error line, a KmodError, "not found"), never a traceback."""

from __future__ import annotations

from pathlib import Path

import pytest

from kvc.kmod.moddir import ModuleDirectory, parse_dep_line
from kvc.kmod.tools import modinfo


def test_a_nul_ends_a_modules_dep_line_as_it_ends_libkmods_c_string() -> None:
    assert parse_dep_line("kernel/foo.ko\0junk: kernel/bar.ko") is None
    dep = parse_dep_line("kernel/foo.ko: kernel/bar.ko\0.ko kernel/baz.ko")
    assert dep is not None and dep.path == "kernel/foo.ko" and dep.dependencies == ("kernel/bar.ko",)


def test_modinfo_by_name_survives_a_nul_in_the_text_modules_dep(
    tmp_path: Path, capfdbinary: pytest.CaptureFixture[bytes]
) -> None:
    # Found by fuzzing: with no modules.dep.bin, a NUL inside the module path of a text
    # modules.dep line reached open() and raised ValueError ("embedded null byte").
    moddir = tmp_path / "lib" / "modules" / "6.1.0-fuzz"
    moddir.mkdir(parents=True)
    (moddir / "modules.dep").write_bytes(b"kernel/net\0/fo.ko: kernel/bar.ko\nkernel/bar.ko:\n")
    entry = ModuleDirectory(str(moddir)).lookup_module("fo")
    assert entry is None
    status = modinfo.main(["-b", str(tmp_path), "-k", "6.1.0-fuzz", "bar", "fo"])
    err = capfdbinary.readouterr().err.decode()
    assert status == 1
    assert "Traceback" not in err
    assert "modinfo: ERROR: Module fo not found." in err


def test_depmod_reads_a_nul_in_a_depmod_d_line_as_the_end_of_the_line(
    tmp_path: Path, capfdbinary: pytest.CaptureFixture[bytes]
) -> None:
    # Found with the fuzz driver: os.scandir() raised ValueError for an external directory with a
    # NUL in it. kmod's depmod parses each line as a C string, so the NUL ends the line there.
    from kvc.kmod.tools import depmod

    moddir = tmp_path / "lib" / "modules" / "6.1.0-fuzz"
    moddir.mkdir(parents=True)
    (moddir / "modules.order").write_text("")
    conf = tmp_path / "fuzz.conf"
    conf.write_bytes(b"external * /nonexistent/kvc-fuzz\0/x\noverride dum\0my * extra\n")
    status = depmod.main(["-n", "-b", str(tmp_path), "-C", str(conf), "--no-cache", "--jobs=1", "6.1.0-fuzz"])
    err = capfdbinary.readouterr().err.decode()
    assert status == 0
    assert err.splitlines() == [
        f"depmod: ERROR: {conf}:2: ignoring bad line starting with 'override'",
        "depmod: ERROR: could not open directory /nonexistent/kvc-fuzz: No such file or directory",
    ]


def test_depmod_refuses_a_jobs_count_of_other_digits(capfdbinary: pytest.CaptureFixture[bytes]) -> None:
    from kvc.kmod.tools import depmod

    assert depmod.main(["--jobs=²", "-n", "6.1.0-fuzz"]) == 1
    assert capfdbinary.readouterr().err.decode() == "depmod: FATAL: --jobs needs a number, not '²'\n"
