"""``gateway test`` as a command: the default routes.test.yaml passes against the default
routes.yaml (CI runs it here), and a failing case exits 1 with its line and JUnit XML."""

from __future__ import annotations

import shutil
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

from tests.peers import REPO_ROOT


def gateway(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "gateway", *args],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=cwd,
    )


def test_the_default_route_tests_pass(tmp_path: Path) -> None:
    for name in ("routes.yaml", "routes.test.yaml", "users", "webhook.secret"):
        shutil.copy(REPO_ROOT / name, tmp_path / name)
    shutil.copytree(REPO_ROOT / "plugins", tmp_path / "plugins")
    junit = tmp_path / "junit.xml"
    out = gateway("test", "--junit", str(junit), cwd=tmp_path)
    assert out.returncode == 0, out.stdout + out.stderr
    lines = out.stdout.splitlines()
    assert lines[-1].endswith(" passed, 0 failed")
    count = int(lines[-1].split()[0])
    assert count >= 12 and all(" ok    " in line for line in lines[:-1])
    suite = ET.parse(junit).getroot()
    assert suite.get("tests") == str(count) and suite.get("failures") == "0"
    # Nothing was sent or stored: no spool, no Maildir.
    assert not (tmp_path / "var").exists()


def test_a_failing_case_exits_1_naming_its_line(tmp_path: Path) -> None:
    for name in ("routes.yaml", "users", "webhook.secret"):
        shutil.copy(REPO_ROOT / name, tmp_path / name)
    shutil.copytree(REPO_ROOT / "plugins", tmp_path / "plugins")
    (tmp_path / "more.test.yaml").write_text(
        "version: 1\ntests:\n"
        "  - name: partner mail\n"
        "    mail: {from: a@example.test, to: [bob@partner.test], headers: {Subject: s}}\n"
        "    expect: {routes: [relay-partner]}\n"
        "  - name: expects the wrong destination\n"
        "    mail: {from: a@example.test, to: [bob@partner.test], headers: {Subject: s}}\n"
        "    expect: {destinations: [mailbox]}\n"
    )
    out = gateway("test", "more.test.yaml", cwd=tmp_path)
    assert out.returncode == 1, out.stdout + out.stderr
    assert "more.test.yaml:3:5: ok    partner mail" in out.stdout
    assert "more.test.yaml:6:5: FAIL  expects the wrong destination" in out.stdout
    assert "expected destinations ['mailbox'], got ['smarthost']" in out.stdout
    assert "route 'relay-partner' matches for bob@partner.test" in out.stdout
    assert out.stdout.endswith("1 passed, 1 failed\n")
    missing = gateway("test", "nothere.yaml", cwd=tmp_path)
    assert missing.returncode == 2 and "cannot read nothere.yaml" in missing.stderr
