"""The fuzz harnesses in the test run: the corpus replayed, then each harness under atheris for
a short, fixed number of inputs (the long runs and their record: tests/fuzz/README.md)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.fuzz.harnesses import HARNESSES
from tests.peers import REPO_ROOT

CORPUS = Path(__file__).resolve().parent / "corpus"
# Inputs per harness in a test run: a few seconds each. Parsing routes.yaml is slower.
RUNS = {"routes_yaml": 1500, "nntp_server": 3000}
DEFAULT_RUNS = 8000


def corpus_files() -> list[tuple[str, Path]]:
    return [
        (folder.name, path)
        for folder in sorted(CORPUS.iterdir())
        if folder.is_dir()
        for path in sorted(folder.iterdir())
    ]


def test_every_harness_has_a_seed_corpus() -> None:
    assert {name for name, _ in corpus_files()} == set(HARNESSES)


@pytest.mark.parametrize(
    ("name", "path"), corpus_files(), ids=[f"{n}/{p.name[:12]}" for n, p in corpus_files()]
)
def test_the_corpus_replays_cleanly(name: str, path: Path) -> None:
    """Every input kept (seeds, and each crash found, fixed since) passes its harness."""
    HARNESSES[name](path.read_bytes())


@pytest.mark.parametrize("name", sorted(HARNESSES))
def test_a_short_coverage_guided_run_finds_nothing(name: str, tmp_path: Path) -> None:
    corpus = tmp_path / "corpus"
    shutil.copytree(CORPUS / name, corpus)  # the run adds inputs; the repository's stay
    runs = RUNS.get(name, DEFAULT_RUNS)
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT))
    result = subprocess.run(
        [sys.executable, "-m", "tests.fuzz.run", name, f"-runs={runs}", "-seed=1",
         "-max_len=4096", "-timeout=10", f"-artifact_prefix={tmp_path}/", str(corpus)],
        capture_output=True, text=True, errors="replace", timeout=300, check=False,
        cwd=tmp_path, env=env,
    )  # fmt: skip
    tail = "\n".join(result.stderr.splitlines()[-40:])
    assert result.returncode == 0, tail
    assert f"Done {runs} runs" in result.stderr, tail
