"""containerd's own account of a `ctr run`: `ctr events` stamps each event (snapshot prepared,
container created, task created and started) with the publisher's wall clock, which splits the
time to the first output line into what containerd, its shim and the runtime each took.
"""
from __future__ import annotations

import datetime
import json
import subprocess
from typing import Any

# A run's milestones in order, with the phase each one ends (from the previous milestone).
MILESTONES = (
    ("/snapshot/prepare", "ctr start, image, snapshot"),
    ("/containers/create", "container record"),
    ("/tasks/create", "shim start + kata-runtime create"),
)
# The last phase ends at the first output line. The shim publishes /tasks/start only once
# `kata-runtime start` has returned, which is often after the output arrived, so that event is
# not a milestone; how long start took is reported beside the phases instead.
FIRST_OUTPUT = "kata-runtime start, echo, output to ctr"
START_RETURNED = "(kata-runtime start returned, after task create)"
# `ctr events` exits once containerd stops; a kill is for the case where it does not.
STOP_TIMEOUT_S = 10.0


def _subject(topic: str, event: dict[str, Any]) -> str:
    """The container an event is about: snapshot keys and container records name it as their id."""
    if topic == "/snapshot/prepare":
        return str(event.get("key", ""))
    return str(event.get("container_id") or event.get("id") or "")


def _wall_seconds(date: str, clock: str) -> float:
    """`2026-11-30 20:57:52.123456789` (UTC, as Go prints time.Time) as epoch seconds."""
    whole, _, fraction = clock.partition(".")
    stamp = datetime.datetime.strptime(f"{date} {whole}", "%Y-%m-%d %H:%M:%S").replace(tzinfo=datetime.timezone.utc)
    return stamp.timestamp() + (float("0." + fraction) if fraction else 0.0)


def parse(text: str) -> dict[str, dict[str, float]]:
    """Per container, the epoch time of the first event of each topic (lines `ctr events` prints:
    `<date> <time> +0000 UTC <namespace> <topic> <json>`)."""
    seen: dict[str, dict[str, float]] = {}
    for line in text.splitlines():
        fields = line.split(" ", 6)
        if len(fields) < 7 or fields[2:4] != ["+0000", "UTC"]:
            continue
        try:
            event = json.loads(fields[6])
            at = _wall_seconds(fields[0], fields[1])
        except ValueError:
            continue
        if isinstance(event, dict):
            seen.setdefault(_subject(fields[5], event), {}).setdefault(fields[5], at)
    return seen


def phases(events: dict[str, float], spawned: float, first_ms: float) -> dict[str, float]:
    """ms per phase of one run, from spawning ctr (epoch `spawned`) to its first output line;
    empty when a milestone is missing (the subscriber missed it)."""
    if any(topic not in events for topic, _ in MILESTONES):
        return {}
    result: dict[str, float] = {}
    previous = spawned
    for topic, label in MILESTONES:
        result[label] = round((events[topic] - previous) * 1000, 1)
        previous = events[topic]
    result[FIRST_OUTPUT] = round(first_ms - (previous - spawned) * 1000, 1)
    if "/tasks/start" in events:
        result[START_RETURNED] = round((events["/tasks/start"] - events["/tasks/create"]) * 1000, 1)
    return result


class Subscriber:
    """`ctr events` in the background, its lines into `path` until stop()."""

    def __init__(self, argv: list[str], path: str, env: dict[str, str]) -> None:
        self.path = path
        with open(path, "w") as out:
            self.proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.DEVNULL,
                                         env=env)

    def read(self) -> dict[str, dict[str, float]]:
        with open(self.path) as f:
            return parse(f.read())

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
