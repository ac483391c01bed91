"""Sandbox start: a placeholder until `kata-runtime run` exists.

What it will measure: `kata-runtime run` of a container until its process
runs in a factory VM (get_vm, 9p share, container start), per strategy.
"""
from __future__ import annotations

from tests.bench import common, runner

NOT_YET = "not yet: needs the sandbox lifecycle"


async def run(bench: runner.Bench, section: common.Section) -> None:
    section.tables.append(common.Table(
        "Sandbox start (kata-runtime run → container process running)",
        ["strategy", "p50", "p90", "status"],
        [[strategy, "–", "–", NOT_YET] for strategy in ("direct", "template", "cache", "VMCache")],
        "Another engineer is building `kata-runtime run`; this section fills in once it exists."))
    section.data["status"] = NOT_YET


SPEC = runner.Spec("sandbox", "5. Sandbox start", run)

if __name__ == "__main__":
    runner.run("sandbox", [SPEC])
