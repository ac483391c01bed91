"""kata-runtime's runc surface without a VM: the command lines go-runc builds parse, the --log
lines read back as containerd reads them, `state` is runc's JSON, signals parse by name or number,
and `features` tells the truth about the guest."""
from __future__ import annotations

import io
import json
import logging
import re
import signal

import pytest
from absl import flags

from guest.agent import containment
from runtime import features, main
from runtime.runtime_log import RuntimeLogHandler, format_line, last_error
from runtime.sandbox.commands import parse_signal
from runtime.sandbox.state import ContainerError, ContainerState, StateStore, Status, now_rfc3339

FLAGS = flags.FLAGS


@pytest.fixture(autouse=True)
def fresh_flags():
    FLAGS.unparse_flags()
    yield
    FLAGS.unparse_flags()


def test_go_runcs_create_parses_with_global_flags_first():
    rest = main._parse_flags(["kata-runtime", "--root", "/run/containerd/runc/default", "--log", "/b/log.json",
                              "--log-format", "json", "--systemd-cgroup", "create", "--bundle", "/b",
                              "--pid-file", "/b/init.pid", "--console-socket", "/tmp/c.sock", "--no-pivot",
                              "--no-new-keyring", "c1"])
    assert rest == ["kata-runtime", "create", "c1"]
    assert (FLAGS.root, FLAGS.log, FLAGS.log_format, FLAGS.systemd_cgroup) == (
        "/run/containerd/runc/default", "/b/log.json", "json", True)
    assert (FLAGS.bundle, FLAGS.pid_file, FLAGS.console_socket) == ("/b", "/b/init.pid", "/tmp/c.sock")


def test_go_runcs_exec_kill_delete_and_ps_parse():
    rest = main._parse_flags(["kata-runtime", "--root", "/r", "exec", "--process", "/tmp/runc-process1",
                              "--detach", "--pid-file", "/b/e1.pid", "c1"])
    assert rest == ["kata-runtime", "exec", "c1"] and FLAGS.detach and FLAGS.process == "/tmp/runc-process1"
    FLAGS.unparse_flags()
    assert main._parse_flags(["kata-runtime", "kill", "--all", "c1", "9"]) == ["kata-runtime", "kill", "c1", "9"]
    assert FLAGS["all"].value
    FLAGS.unparse_flags()
    assert main._parse_flags(["kata-runtime", "delete", "--force", "c1"]) == ["kata-runtime", "delete", "c1"]
    FLAGS.unparse_flags()
    assert main._parse_flags(["kata-runtime", "ps", "--format", "json", "c1"]) == ["kata-runtime", "ps", "c1"]
    assert FLAGS.format == "json"


@pytest.mark.parametrize("argv", [
    ["exec", "c1", "--", "sh", "-c", "echo --root"],
    ["exec", "c1", "sh", "-c", "echo --root"],  # runc's form: everything after the ID is the process's
    ["--root", "/r", "exec", "--cwd", "/tmp", "-e", "A=1", "c1", "sh", "-c", "echo --root"],
])
def test_a_process_command_line_is_left_alone(argv):
    rest = main._parse_flags(["kata-runtime", *argv])
    assert rest == ["kata-runtime", "exec", "c1", "sh", "-c", "echo --root"]


def test_ps_options_after_the_id_are_the_host_ps_options():
    assert main._parse_flags(["kata-runtime", "ps", "--format", "table", "c1", "-ef"]) == [
        "kata-runtime", "ps", "c1", "-ef"]


def test_flags_after_the_command_still_work():
    assert main._parse_flags(["kata-runtime", "run", "c1", "--bundle", "/b"]) == ["kata-runtime", "run", "c1"]
    assert FLAGS.bundle == "/b"


def test_an_unknown_flag_is_one_line_naming_it(capsys):
    with pytest.raises(SystemExit) as exited:
        main._parse_flags(["kata-runtime", "--log-fromat", "json", "state", "c1"])
    assert exited.value.code == 1
    assert capsys.readouterr().err.startswith("kata-runtime: unknown flag --log-fromat")


def test_short_v_is_runcs_version(capsys):
    assert main._parse_flags(["kata-runtime", "-v"]) == ["kata-runtime"] and FLAGS.version
    assert main.main(["kata-runtime"]) == 0
    lines = capsys.readouterr().out.splitlines()
    # go-runc's parseVersion: three lines, the first split on "version ", the others on ": ".
    assert len(lines) == 3 and lines[0].startswith("kata-runtime version ")
    assert lines[2] == f"spec: {main.SPEC_VERSION}"


def test_errors_reach_the_json_log_as_containerd_reads_it(tmp_path, capsys):
    log = tmp_path / "log.json"
    main._parse_flags(["kata-runtime", "--root", str(tmp_path / "state"), "--log", str(log), "--log-format",
                       "json", "state", "nope"])
    try:
        assert main.main(["kata-runtime", "state", "nope"]) == 1
    finally:
        for handler in list(main._RUNTIME_LOG.handlers):
            if isinstance(handler, RuntimeLogHandler):
                main._RUNTIME_LOG.removeHandler(handler)
                handler.stream.close()
        logging.getLogger().handlers[:] = []
    assert "does not exist" in capsys.readouterr().err
    entry = json.loads(log.read_text().splitlines()[-1])
    assert entry["level"] == "error" and "does not exist" in entry["msg"]
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", entry["time"])
    assert "does not exist" in last_error(str(log))


def test_log_lines_in_both_of_runcs_formats():
    assert json.loads(format_line("error", 'a "quoted" msg', "json", 0)) == {
        "level": "error", "msg": 'a "quoted" msg', "time": "1970-01-01T00:00:00Z"}
    assert format_line("warning", "x y", "text", 0) == 'time="1970-01-01T00:00:00Z" level=warning msg="x y"'


def test_last_error_is_the_last_error_line(tmp_path):
    stream = io.StringIO()
    logger = logging.getLogger("test_runc_cli")
    logger.propagate = False
    logger.addHandler(RuntimeLogHandler(stream, "json"))
    logger.error("first")
    logger.warning("not an error")
    logger.error("second ")
    path = tmp_path / "log.json"
    path.write_text(stream.getvalue())
    assert last_error(str(path)) == "second"


def _state(status: Status, **fields) -> ContainerState:
    return ContainerState(id="c1", bundle="/b", status=status, guest_pid=7, shim_pid=4242, rootfs="/b/rootfs",
                          created="2026-01-02T03:04:05.123456789Z", **fields)


@pytest.mark.parametrize("status,pid", [(Status.CREATED, 4242), (Status.RUNNING, 4242), (Status.PAUSED, 4242),
                                        (Status.STOPPED, 0), (Status.CREATING, 0)])
def test_state_is_runcs_json_with_the_host_pid(status, pid):
    assert _state(status).oci() == {
        "ociVersion": "1.0.2", "id": "c1", "pid": pid, "status": str(status), "bundle": "/b", "rootfs": "/b/rootfs",
        "created": "2026-01-02T03:04:05.123456789Z", "owner": "",
        "annotations": {"io.katacontainers.pid.guest": "7"}}


def test_created_has_nanoseconds():
    assert now_rfc3339(1_700_000_000_000_000_042) == "2023-11-14T22:13:20.000000042Z"
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{9}Z", now_rfc3339())


def test_a_state_file_with_fields_of_another_version_still_loads(tmp_path):
    store = StateStore(str(tmp_path))
    store.reserve("c1")
    (tmp_path / "c1" / "state.json").write_text(json.dumps({"id": "c1", "bundle": "/b", "status": "running",
                                                             "pid": 9, "from_the_future": True}))
    assert store.load("c1").status == Status.RUNNING
    (tmp_path / "c1" / "state.json").write_text("[]")
    with pytest.raises(ContainerError, match="unreadable"):
        store.load("c1")


@pytest.mark.parametrize("name,number", [("KILL", 9), ("SIGKILL", 9), ("sigterm", 15), ("9", 9), ("15", 15),
                                         ("TERM", 15), ("USR1", int(signal.SIGUSR1))])
def test_signals_by_name_or_number(name, number):
    assert parse_signal(name) == number


@pytest.mark.parametrize("name", ["NOPE", "SIGNOPE", "-1", ""])
def test_an_unknown_signal_is_refused_by_name(name):
    with pytest.raises(ContainerError, match="signal"):
        parse_signal(name)


def test_features_are_what_the_guest_implements():
    document = features.features()
    assert document["linux"]["capabilities"] == ["CAP_" + c for c in containment.CAPABILITIES]
    assert set(document["mountOptions"]) == set(containment.MOUNT_FLAGS) | containment.PROPAGATION_OPTIONS
    # The hooks run on the host; startContainer would run inside the guest and is skipped.
    assert document["hooks"] == ["prestart", "createRuntime", "createContainer", "poststart", "poststop"]
