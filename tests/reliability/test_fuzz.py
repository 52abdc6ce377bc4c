"""The CI-sized fuzz run (scripts/fuzz.sh runs 100,000 cases nightly): 10,000 mutated modules,
indexes, confs, dkms.conf records and DKMS archives through kvc's readers, with a fixed seed. Zero
tracebacks, zero hangs, every worker under the memory cap; and the harness itself is shown to
count a planted hang and a planted traceback (so a green run means something)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from support.debian_kernel import DebianKernel

pytestmark = pytest.mark.reliability

FUZZ = Path(__file__).resolve().parents[2] / "scripts" / "fuzz.py"
CASES = 10_000
SEED = 20261205
RSS_CAP_MB = 768
KINDS = ("module", "index", "modprobe.d", "depmod.d", "kvc-conf", "dkms-rec", "dkms-src")


def fuzz(tmp: Path, *args: str) -> tuple[subprocess.CompletedProcess[str], dict[str, dict[str, int]]]:
    counts = tmp / "counts.json"
    proc = subprocess.run(
        [
            *(sys.executable, str(FUZZ), "--corpus", str(tmp / "corpus"), "--failures", str(tmp / "failures")),
            *("--json", str(counts), "--rss-cap", str(RSS_CAP_MB), *args),
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    print(proc.stdout, proc.stderr)
    return proc, json.loads(counts.read_text()) if counts.exists() else {}


@pytest.fixture(scope="module")
def corpus(indexed_kernel_tree: DebianKernel, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One prepared corpus for both runs (Debian's modules, a small tree indexed by Debian's depmod)."""
    return tmp_path_factory.mktemp("fuzz")


def test_ten_thousand_cases_give_no_traceback_no_hang_and_stay_under_the_cap(corpus: Path) -> None:
    proc, counts = fuzz(corpus, "--cases", str(CASES), "--seed", str(SEED), "--timeout", "20")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert sum(counts[kind]["cases"] for kind in KINDS) == CASES
    for kind in KINDS:
        tally = counts[kind]
        assert tally["tracebacks"] == 0 and tally["hangs"] == 0, (kind, tally)
        # The mutations reach both outcomes of every reader: accepted and refused.
        assert tally["clean"] > 0 and tally["errors"] > 0, (kind, tally)
        assert 0 < tally["peak_rss_kb"] < RSS_CAP_MB * 1024, (kind, tally)
    assert not (corpus / "failures").exists()


def test_the_harness_counts_a_hang_and_a_traceback(corpus: Path) -> None:
    proc, counts = fuzz(corpus, "--cases", "20", "--seed", str(SEED), "--timeout", "3", "--plant")
    assert proc.returncode == 1
    assert sum(t["hangs"] for t in counts.values() if isinstance(t, dict)) == 1
    assert sum(t["tracebacks"] for t in counts.values() if isinstance(t, dict)) == 1
    saved = sorted(path.name for path in (corpus / "failures").iterdir())
    assert len(saved) == 4  # each failing input and its report
    assert any(name.endswith("-hang.input") for name in saved)
    assert "RuntimeError: planted failure" in "".join(
        path.read_text() for path in (corpus / "failures").glob("*-traceback.txt")
    )
