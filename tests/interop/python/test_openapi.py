"""The OpenAPI document is the contract: `schemathesis` (PyPI, pinned) generates requests from
`GET /api/openapi.json` of a real `herald serve` process and checks every answer against the
document — status codes, content types, headers, response bodies, 405s and their `Allow`
header, and no 5xx. When the document and the server disagree, this test fails and prints
schemathesis's report (with a `curl` line reproducing each failure).

The run is bounded (`--max-examples` per operation, no stateful phase) so it takes well under a
minute, and seeded so that a failure reproduces (`SCHEMATHESIS_SEED` explores other inputs).
"""

from __future__ import annotations

import os
import subprocess
import sys

import requests

# Checks that matter for "the document is true": each answer is documented and matches.
CHECKS = ",".join(
    [
        "not_a_server_error",
        "status_code_conformance",
        "content_type_conformance",
        "response_schema_conformance",
        "response_headers_conformance",
        # An HTTP method the document does not list gets 405 with an `Allow` header, and an
        # `OPTIONS` answer's `Allow` lists exactly the documented methods.
        "unsupported_method",
        "allow_header_conformance",
    ]
)
# Per operation and phase; the coverage phase adds its boundary cases on top.
MAX_EXAMPLES = os.environ.get("SCHEMATHESIS_MAX_EXAMPLES", "25")
# Fixed so that a failure reproduces; set SCHEMATHESIS_SEED to explore other inputs.
SEED = os.environ.get("SCHEMATHESIS_SEED", "20261101")
TIMEOUT = 300


def test_server_answers_as_its_openapi_document_says(herald, tmp_path) -> None:
    schema_url = f"{herald.url}/api/openapi.json"
    document = requests.get(schema_url, timeout=10)
    assert document.status_code == 200
    assert document.headers["content-type"] == "application/json"
    command = [
        sys.executable,
        "-m",
        "schemathesis.cli",
        "run",
        schema_url,
        "--url",
        herald.url,
        "--header",
        f"X-API-Key: {herald.api_key}",
        "--checks",
        CHECKS,
        "--phases",
        "examples,coverage,fuzzing",
        "--max-examples",
        MAX_EXAMPLES,
        "--seed",
        SEED,
        # One worker: with several, Python 3.11's `ast` (which Hypothesis uses to describe
        # strategies) sometimes fails with "AST constructor recursion depth mismatch".
        "--workers",
        "1",
        # No example database: every run starts from the seed alone.
        "--generation-database",
        "none",
        "--request-timeout",
        "10",
        "--no-color",
        "--report",
        "junit",
        "--report-dir",
        str(tmp_path / "schemathesis-report"),
    ]
    result = subprocess.run(
        command,
        cwd=tmp_path,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
    )
    report = f"{result.stdout}\n{result.stderr}"
    assert result.returncode == 0, (
        f"schemathesis found the server and docs/openapi.json disagreeing (exit {result.returncode}):\n"
        f"{report[-20000:]}{herald.process.diagnostics() if herald.process else ''}"
    )
    # Guard against a run that tested nothing (e.g. a document it could not load).
    assert "passed" in report, report[-5000:]
