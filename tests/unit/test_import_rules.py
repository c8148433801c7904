"""The layering of the package, checked on its source (imports inside functions included).

* A protocol (``gateway/protocols/...``) never imports the service, the spool,
  the delivery workers, the metrics or the admin site: it is handed a
  GatewayPort and publishes Metric values.  Nor does it import another
  protocol: what several share is in ``gateway/protocols/_*.py`` or the core.
* The core imports no protocol module; it may ask the registry
  (``from gateway.protocols import registry``), nothing below it.
* Transforms import no protocol module.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[2] / "gateway"

FORBIDDEN_IN_PROTOCOLS = (
    "gateway.service",
    "gateway.spool",
    "gateway.metrics",
    "gateway.delivery",
    "gateway.admin",
    "gateway.cli",
    "gateway.queue_cli",
)
_BELOW = tuple(f"{m}." for m in FORBIDDEN_IN_PROTOCOLS)
# What the core may take from the registry package itself (not from a protocol in it).
REGISTRY_NAMES = {"registry", "Registry", "RegistryError", "AddedKey", "BUILTIN", "load"}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imports(path: Path, source: str | None = None) -> list[tuple[int, str, str | None]]:
    """(line, module, name) of every import in a file, relative ones made absolute.

    ``name`` is the imported name for ``from m import name`` (None for ``import m``).
    """
    tree = ast.parse(source if source is not None else path.read_text(), str(path))
    here = module_name(path)
    package = here if path.name == "__init__.py" else here.rpartition(".")[0]
    found: list[tuple[int, str, str | None]] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.extend((node.lineno, alias.name, None) for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join([*anchor, *([base] if base else [])])
            found.extend((node.lineno, base, alias.name) for alias in node.names)
    return found


def targets(module: str, name: str | None) -> list[str]:
    """The modules an import may load: the module, and ``module.name`` when that is one."""
    return [module] if name is None else [module, f"{module}.{name}"]


def violations(path: Path, source: str | None = None) -> list[str]:
    here = module_name(path)
    found = []
    for line, module, name in imports(path, source):
        if not module.startswith("gateway"):
            continue
        loaded = targets(module, name)
        where = f"{path.relative_to(PACKAGE.parent)}:{line}"
        if here.startswith("gateway.protocols."):
            bad = [m for m in loaded if m in FORBIDDEN_IN_PROTOCOLS or m.startswith(_BELOW)]
            if bad:
                found.append(f"{where}: a protocol imports {bad[0]}")
            own = here.split(".")[2]
            for target in loaded:
                parts = target.split(".")
                if target.startswith("gateway.protocols.") and not (
                    parts[2] == own or parts[2].startswith("_") or own.startswith("_")
                ):
                    found.append(f"{where}: a protocol imports another protocol's {target}")
                    break
        elif here.startswith("gateway.transforms"):
            if module.startswith("gateway.protocols"):
                found.append(f"{where}: a transform imports {module}")
        elif here != "gateway.protocols" and module.startswith("gateway.protocols"):
            if module != "gateway.protocols":
                found.append(f"{where}: the core imports {module}")
            elif name not in REGISTRY_NAMES:
                found.append(f"{where}: the core imports {module}.{name}")
    return found


SOURCES = sorted(PACKAGE.rglob("*.py"))


def test_the_package_is_found() -> None:
    names = {module_name(p) for p in SOURCES}
    assert {"gateway.config", "gateway.service", "gateway.protocols.smtp.listener"} <= names


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: str(p.relative_to(PACKAGE)))
def test_imports_follow_the_layers(path: Path) -> None:
    assert violations(path) == []


@pytest.mark.parametrize(
    ("where", "source", "problem"),
    [
        (
            "protocols/smtp/listener.py",
            "def f():\n    from gateway.service import GatewayService\n",
            "a protocol imports gateway.service",
        ),
        (
            "protocols/dns/doh_client.py",
            "from gateway.protocols.http.codec import Request\n",
            "a protocol imports another protocol's gateway.protocols.http.codec",
        ),
        (
            "protocols/nntp/poller.py",
            "from gateway import spool\n",
            "a protocol imports gateway.spool",
        ),
        (
            "metrics.py",
            "def f():\n    from gateway.protocols.dns.listener import DnsListener\n",
            "the core imports gateway.protocols.dns.listener",
        ),
        (
            "service.py",
            "from gateway.protocols import smtp\n",
            "the core imports gateway.protocols.smtp",
        ),
        (
            "transforms/http_mail.py",
            "from gateway.protocols.http.webhook import sign\n",
            "a transform imports gateway.protocols.http.webhook",
        ),
        (
            "protocols/http/webhook.py",
            "from ...service import Runtime\n",
            "a protocol imports gateway.service",
        ),
    ],
)
def test_a_broken_rule_is_found(where: str, source: str, problem: str) -> None:
    """The checker itself: each rule, broken once, inside a function or relatively too."""
    [found] = violations(PACKAGE / where, source)
    assert found.endswith(problem)


def test_the_registry_lookup_is_allowed() -> None:
    assert violations(PACKAGE / "config.py", "from gateway.protocols import registry\n") == []
