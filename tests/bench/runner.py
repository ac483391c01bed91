"""The absl main every benchmark binary shares: flags, one scratch directory,
the benchmarks in order, then the report on stdout, JSON, Markdown and PNG
in --out_dir. A failing benchmark is reported and the next one runs; Ctrl-C
or SIGTERM cancels the running one, whose own cleanup runs, and the partial
report is still written. The scratch sweep runs last, whatever happened.
"""
from __future__ import annotations

import asyncio
import dataclasses
import signal
import sys
import time
import traceback
from pathlib import Path
from typing import Awaitable, Callable, Sequence

from absl import app, flags

from tests.bench import common
from tests.bench.scratch import Scratch

flags.DEFINE_bool("quick", False, "fewer repetitions and smaller N: a few minutes on 2 cores")
flags.DEFINE_string("out_dir", None, "where to write <name>.json, .md and .png "
                    "(default: $BUILD_WORKING_DIRECTORY/bench-results, else a temp dir)")
FLAGS = flags.FLAGS


@dataclasses.dataclass
class Bench:
    """What a benchmark gets: the mode and a directory it may fill (swept at the end)."""
    quick: bool
    scratch: Scratch
    initrd_path: str  # pinned copy of the guest initramfs (common.pin_initrd)

    def vm_config(self):
        return common.vm_config(self.initrd_path)

    def dir(self, name: str) -> str:
        path = self.scratch.path(name)
        Path(path).mkdir(exist_ok=True)
        return path


@dataclasses.dataclass(frozen=True)
class Spec:
    key: str
    title: str
    # Fills the section as it goes, so a failure part-way keeps what was measured.
    run: Callable[[Bench, common.Section], Awaitable[None]]


async def _run_all(specs: Sequence[Spec], bench: Bench, sections: list[common.Section]) -> None:
    for spec in specs:
        section = common.Section(spec.key, spec.title)
        sections.append(section)
        common.log(f"{spec.key}: start")
        started = time.monotonic()
        try:
            await spec.run(bench, section)
        except Exception as err:  # the next benchmark still runs
            section.error = f"{type(err).__name__}: {err}".splitlines()[0][:400]
            common.log(f"{spec.key}: FAILED\n{traceback.format_exc()}")
        finally:
            section.seconds = time.monotonic() - started
            common.log(f"{spec.key}: done in {section.seconds:.1f} s")


def _cancel_on_sigterm(task: asyncio.Task, loop: asyncio.AbstractEventLoop) -> None:
    """SIGTERM is handled like Ctrl-C: cancel the benchmark so its finally blocks run."""
    def handler(signum, frame) -> None:
        if not task.done():
            task.cancel()
            loop.call_soon_threadsafe(lambda: None)  # wake the loop
        else:
            raise KeyboardInterrupt
    signal.signal(signal.SIGTERM, handler)


async def _main_task(specs: Sequence[Spec], bench: Bench, sections: list[common.Section]) -> None:
    _cancel_on_sigterm(asyncio.current_task(), asyncio.get_running_loop())
    await _run_all(specs, bench, sections)


def run(name: str, specs: Sequence[Spec]) -> None:
    """absl entry point for the binary `name` running `specs` in order."""

    def main(argv: Sequence[str]) -> int:
        if len(argv) > 1:
            raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
        mode = "quick" if FLAGS.quick else "full"
        out_dir = Path(FLAGS.out_dir) if FLAGS.out_dir else common.default_out_dir()
        out_dir.mkdir(parents=True, exist_ok=True)
        env = common.environment()
        common.log(f"{name} ({mode}); accelerator {env['accelerator']}; results go to {out_dir}")
        scratch = Scratch()
        sections: list[common.Section] = []
        interrupted = False
        try:
            bench = Bench(quick=FLAGS.quick, scratch=scratch, initrd_path=common.pin_initrd(scratch.root))
            asyncio.run(_main_task(specs, bench, sections))
        except (KeyboardInterrupt, asyncio.CancelledError):
            interrupted = True
            common.log("interrupted: cleaning up and writing the partial report")
        finally:
            leaks = scratch.sweep()
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
        if leaks:
            common.log("the final sweep had to clean up: " + "; ".join(leaks))
        command = f"bazel run //tests/bench:{name}" + (" -- --quick" if FLAGS.quick else "")
        env["cleanup_sweep"] = leaks
        report = common.render_markdown(env, mode + (" (interrupted)" if interrupted else ""), sections, command)
        print(report)
        (out_dir / f"{name}.md").write_text(report)
        common.write_json(out_dir / f"{name}.json", env, mode, sections)
        wrote_png = common.write_chart(out_dir / f"{name}.png", sections, f"{mode}, {env['accelerator']}, "
                                       f"{env['cores']} cores")
        files = [f"{name}.md", f"{name}.json"] + ([f"{name}.png"] if wrote_png else [])
        print(f"results: {', '.join(str(out_dir / f) for f in files)}", file=sys.stderr)
        return 130 if interrupted else (1 if any(s.error for s in sections) else 0)

    app.run(main)
