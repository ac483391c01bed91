"""OCI hooks run on the host as runc runs them: state on stdin, own argv and env, timeouts, failures."""
from __future__ import annotations

import json
import os
import stat
import time

import pytest

from runtime.oci.hooks import Hook, HookError, parse_hooks, run_hook, run_stage

# How long a SIGKILLed process may take to show as dead on a loaded machine.
CHILD_GONE_TIMEOUT_S = 10.0
STATE = {"ociVersion": "1.0.2", "id": "c1", "status": "creating", "pid": 4242, "bundle": "/b", "annotations": {}}


def _script(tmp_path, name: str, body: str) -> str:
    path = tmp_path / name
    path.write_text("#!/bin/sh\n" + body)
    path.chmod(path.stat().st_mode | stat.S_IXUSR)
    return str(path)


def test_a_hook_gets_the_state_on_stdin_its_argv_and_only_its_env(tmp_path):
    out = tmp_path / "out"
    hook = Hook(_script(tmp_path, "h", f'cat > {out}.state; echo "$0 $1 $WHO ${{HOME:-nohome}}" > {out}\n'),
                ["named-hook", "arg1"], ["WHO=engine"], timeout_s=30)
    run_hook(hook, STATE, cwd=str(tmp_path))
    assert json.loads((tmp_path / "out.state").read_text()) == STATE
    assert out.read_text().split() == [hook.path, "arg1", "engine", "nohome"] or \
        out.read_text().split()[1:] == ["arg1", "engine", "nohome"]


def test_a_failing_hook_names_its_status_and_output(tmp_path):
    hook = Hook(_script(tmp_path, "fail", "echo 'no network for you' >&2; exit 3\n"), [], [])
    with pytest.raises(HookError, match=r"exited with status 3: no network for you"):
        run_hook(hook, STATE)


def test_a_hook_past_its_timeout_is_killed_with_its_children(tmp_path):
    child_pid = tmp_path / "child.pid"
    hook = Hook(_script(tmp_path, "slow", f"sleep 1000 & echo $! > {child_pid}; wait\n"), [], [], timeout_s=1)
    with pytest.raises(HookError, match="timed out after 1 s"):
        run_hook(hook, STATE)
    pid = int(child_pid.read_text())
    # Killed as a group: its background child is gone (or a zombie of nobody we know) too. The
    # SIGKILL is delivered asynchronously, so a loaded machine may still show it running briefly.
    deadline = time.monotonic() + CHILD_GONE_TIMEOUT_S
    while True:
        try:
            with open(f"/proc/{pid}/stat") as f:
                state = f.read().split(") ")[1].split()[0]
        except FileNotFoundError:
            break
        if state in ("Z", "X"):
            break
        assert time.monotonic() < deadline, f"the hook's child {pid} outlived the group kill (state {state})"
        time.sleep(0.05)


def test_a_missing_hook_binary_is_an_error(tmp_path):
    with pytest.raises(HookError, match="cannot run it"):
        run_hook(Hook(str(tmp_path / "nope"), [], []), STATE)


def test_a_fatal_stage_stops_at_the_first_failure_a_warning_stage_runs_them_all(tmp_path):
    ran = tmp_path / "ran"
    hooks = {"createRuntime": [Hook(_script(tmp_path, "a", "exit 1\n"), [], []),
                               Hook(_script(tmp_path, "b", f"touch {ran}\n"), [], [])]}
    with pytest.raises(HookError, match="^createRuntime hook .* exited with status 1"):
        run_stage(hooks, "createRuntime", STATE)
    assert not ran.exists()
    hooks["poststop"] = hooks.pop("createRuntime")
    failures = run_stage(hooks, "poststop", STATE, fatal=False)
    assert ran.exists() and len(failures) == 1 and failures[0].startswith("poststop hook")


def test_stages_that_cannot_run_as_in_runc_are_named():
    hooks, warnings = parse_hooks({
        "createContainer": [{"path": "/usr/bin/nvidia-hook"}], "startContainer": [{"path": "/usr/bin/in-ctr"}],
        "poststart": [], "prestart": [{"path": "/bin/true", "args": ["true"], "timeout": 5}]})
    assert set(hooks) == {"createContainer", "prestart"}
    assert hooks["prestart"] == [Hook("/bin/true", ["true"], [], 5)]
    assert any(w.startswith("hooks.startContainer (/usr/bin/in-ctr) is skipped") for w in warnings)
    assert any(w.startswith("hooks.createContainer (/usr/bin/nvidia-hook): it runs on the host") for w in warnings)


def test_the_hook_runs_in_the_given_preexec_environment(tmp_path):
    out = tmp_path / "out"
    hook = Hook(_script(tmp_path, "h", f"echo $MARK > {out}\n"), [], ["MARK=env"])
    run_hook(hook, STATE, preexec=lambda: os.environ.__setitem__("IGNORED", "1"))
    assert out.read_text().strip() == "env"
