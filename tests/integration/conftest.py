"""Fixtures for tests that boot real VMs. Every test gets its own run root;
whatever it leaves behind is killed and removed, and the leak fails the test."""
from __future__ import annotations

import asyncio
import os
import shutil

import pytest

from factory.vm import VM
from tests.integration.vmtest import base_config, clean_up_root, short_tempdir


@pytest.fixture
def run_root():
    root = short_tempdir("kvf-")
    yield root
    leaks = clean_up_root(root)
    assert not leaks, "the test leaked: " + "; ".join(leaks)


@pytest.fixture(scope="session")
def template():
    """One template shared by every test that only needs clones: boot, pause, save, stop.

    Its memory file lives on /dev/shm (tmpfs), as the factory's template does.
    Yields the config a clone of it boots from.
    """
    tpl_dir = short_tempdir("kvf-tpl-")
    run = short_tempdir("kvf-trun-")
    memory = os.path.join("/dev/shm", os.path.basename(tpl_dir) + "-memory")
    state = os.path.join(tpl_dir, "state")

    async def make() -> None:
        vm = await VM.new(base_config(boot_to_be_template=True, memory_path=memory), run)
        try:
            await vm.agent.close()
            await vm.pause()
            await vm.save(state)
        finally:
            await vm.stop()

    try:
        asyncio.run(make())
        yield base_config(boot_from_template=True, memory_path=memory, devices_state_path=state)
    finally:
        leaks = clean_up_root(run)
        if os.path.exists(memory):
            os.unlink(memory)
        shutil.rmtree(tpl_dir, ignore_errors=True)
        assert not leaks, "template fixture leaked: " + "; ".join(leaks)
