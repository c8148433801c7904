"""Run one fuzz harness under atheris (libFuzzer for Python), coverage-guided.

    .venv/bin/python -m tests.fuzz.run NAME [libFuzzer options] [CORPUS_DIR ...]

NAME is one of tests/fuzz/harnesses.py (smtp_server, nntp_server, ...). With
no corpus folder given, it uses tests/fuzz/corpus/NAME/ (new inputs that
reach new code are added there: commit the small ones worth keeping).
Examples: ``-runs=1000000`` stops after a million inputs, ``-max_total_time=600``
after ten minutes; a crash writes ``crash-<sha1>`` with the input that did it.
"""

from __future__ import annotations

import sys
from pathlib import Path

import atheris

CORPUS = Path(__file__).resolve().parent / "corpus"


def main(argv: list[str]) -> None:
    if len(argv) < 2 or argv[1].startswith("-"):
        raise SystemExit(__doc__)
    name = argv[1]
    # Instrument the gateway's own code (not the libraries), then import the harnesses.
    with atheris.instrument_imports(include=["gateway"]):
        import gateway.config
        import gateway.protocols.dns.wire
        import gateway.protocols.http.codec
        import gateway.protocols.nntp.client
        import gateway.protocols.nntp.codec
        import gateway.protocols.smtp.codec  # noqa: F401
    from tests.fuzz.harnesses import HARNESSES

    if name not in HARNESSES:
        raise SystemExit(f"no harness {name!r}; there are: {', '.join(sorted(HARNESSES))}")
    options = argv[2:]
    if not any(not option.startswith("-") for option in options):
        corpus = CORPUS / name
        corpus.mkdir(parents=True, exist_ok=True)
        options.append(str(corpus))
    atheris.Setup([argv[0], *options], HARNESSES[name])
    atheris.Fuzz()


if __name__ == "__main__":
    main(sys.argv)
