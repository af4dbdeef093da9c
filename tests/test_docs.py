"""The documentation cannot drift from the code: links resolve, the code cites only the
repository's own design notes, and the documented commands run as written
(scripts/check_docs; docs/testing.md#the-docs-check)."""

from __future__ import annotations

import importlib.machinery
import importlib.util
import os
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest

ROOT = Path(__file__).resolve().parent.parent
README_MAX_LINES = 250

# README blocks not run by the docs check, each with the test that runs it instead.
README_BLOCKS_RUN_ELSEWHERE = {
    "scripts/demo": "test_demo_runs_on_a_small_data_set (below); scripts/test is .ci/run",
    "clickstream serve": "the serving tests (docs/serving.md)",
}


def load_check_docs() -> ModuleType:
    path = ROOT / "scripts" / "check_docs"
    loader = importlib.machinery.SourceFileLoader("check_docs", str(path))
    spec = importlib.util.spec_from_loader("check_docs", loader)
    assert spec is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["check_docs"] = module  # dataclasses look their module up there
    loader.exec_module(module)
    return module


check_docs = load_check_docs()


def test_every_relative_link_and_anchor_resolves() -> None:
    assert check_docs.broken_links() == []


def test_code_cites_docs_pages_that_exist_and_nothing_outside_the_repository() -> None:
    assert check_docs.bad_citations() == []


def test_pending_pages_are_allowed_only_while_missing() -> None:
    """A page in the allowance that now exists must leave it, so its links are checked."""
    landed = sorted(p for p in check_docs.PENDING_PAGES if (ROOT / p).exists())
    assert landed == [], f"remove {landed} from PENDING_PAGES in scripts/check_docs"


# Fake pages below are spelt through D so that the citation check, which reads this file
# too, does not take them for citations of the real docs/.
D = "docs"


def test_the_link_check_catches_a_broken_link_and_anchor(tmp_path: Path) -> None:
    (tmp_path / D).mkdir()
    (tmp_path / D / "a.md").write_text("# A page\n\n## Some `code` here\n")
    (tmp_path / "README.md").write_text(
        f"[ok]({D}/a.md#some-code-here) [gone]({D}/b.md) [anchor]({D}/a.md#nope)\n"
        f"`[in code]({D}/c.md)` [later]({D}/pending.md) [web](https://example.org/x)\n"
        f"```\n[in a fence]({D}/d.md)\n```\n")
    problems = check_docs.broken_links(tmp_path, pending={f"{D}/pending.md"})
    assert len(problems) == 2, problems
    assert f"no file {D}/b.md" in problems[0]
    assert "no heading with anchor #nope" in problems[1]


def test_the_citation_check_catches_a_missing_page_and_an_outside_file(tmp_path: Path
                                                                        ) -> None:
    (tmp_path / D).mkdir()
    (tmp_path / D / "design.md").write_text("# Design\n\n## Dedup\n")
    (tmp_path / "README.md").write_text("# R\n")
    (tmp_path / "m.py").write_text(
        f'"""See {D}/design.md#dedup and {D}/design.md#gone and {D}/nope.md."""\n'
        f"# {check_docs.OUTSIDE_NOTES} says so\n")
    problems = check_docs.bad_citations(tmp_path, pending=())
    assert len(problems) == 3, problems


def test_readme_is_short_and_every_shell_block_is_run_somewhere() -> None:
    readme = ROOT / "README.md"
    assert len(readme.read_text().splitlines()) <= README_MAX_LINES
    blocks = [b for b in check_docs.blocks(readme) if b.info.split()[:1] == ["bash"]]
    unchecked = [b for b in blocks if not b.checked]
    for block in unchecked:
        first = block.text.strip().splitlines()[0]
        assert any(first.startswith(k) for k in README_BLOCKS_RUN_ELSEWHERE), \
            f"README.md:{block.line} is neither `bash check` nor run by a named test"
    tour = [b for b in blocks if b.checked]
    commands = " ".join(b.text for b in tour)
    for step in ("generate", "run", "report", "query", "replay", "finalize"):
        assert f"clickstream {step} " in commands, f"the quick tour lacks `{step}`"


@pytest.mark.integration  # generates and runs the graph several times: about a minute
def test_documented_commands_run_as_written(tmp_path: Path) -> None:
    assert check_docs.checked_blocks(), "no `bash check` block found"
    outcomes = list(check_docs.run_checked_blocks(tmp_path))
    print("\n".join(check_docs.describe(o) for o in outcomes))
    failed = [o for o in outcomes if not o.ok]
    assert not failed, check_docs.describe(failed[0])
    assert len(outcomes) == len(check_docs.checked_blocks())


@pytest.mark.integration  # the demo script end to end: generate + run
def test_demo_runs_on_a_small_data_set() -> None:
    done = subprocess.run([str(ROOT / "scripts" / "demo"), "3000"], cwd=ROOT,
                          capture_output=True, text=True, timeout=600, check=False,
                          env={**os.environ, "PYTHONUNBUFFERED": "1"})
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "[reconciled]" in done.stdout
    assert "out/demo/clickstream.duckdb" in done.stdout


def test_a_block_fails_on_a_nonzero_exit_or_a_missing_expectation(tmp_path: Path) -> None:
    def outcome(text: str):
        block = check_docs.Block("README.md", 1, check_docs.CHECK_INFO, text)
        return check_docs.run_block(block, tmp_path)

    assert outcome("echo hello\n#> hello").ok
    missing = outcome("echo hello\n#> goodbye")
    assert not missing.ok and missing.missing == ["goodbye"]
    assert not outcome("false\necho not reached").ok  # bash -e: the first failure stops it
