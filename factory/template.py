"""The template strategy: one saved VM whose RAM every clone maps copy-on-write.

On disk (a tmpfs at template_path): `memory` (guest RAM), `state` (device
state) and `metadata.json`, which records everything a clone must match;
fetch refuses a template whose metadata differs from the current config
(upstream keeps no metadata and clones a stale template silently).
"""
from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import os
import re
import time
from pathlib import Path
from typing import Any, AsyncIterator

from opentelemetry.context import Context

from factory import hostfacts, memfile, ownership, reaper, template_store, tracing
from factory.base import FactoryBase
from factory.config import VMConfig
from factory.errors import TemplateError
from factory.hypervisor import accelerator, cmdline
from factory.hypervisor.accelerator import Accelerator
from factory.hypervisor.rundir import DEFAULT_RUN_ROOT, RunDir
from factory.ownership import OwnerKind
from factory.vm import VM
from hostos import files, locks, mountinfo, mounts, safetree
from protocols.agent.framing import PROTOCOL_VERSION

DEFAULT_TEMPLATE_PATH = "/run/vc/vm/template"
# tmpfs room beyond guest RAM for the device state (a few hundred KB on x86).
DEVICE_STATE_MIB = 8
# The source name of the template tmpfs in /proc/self/mountinfo: how close() and init tell the
# mount this project made from one a user already had at template_path (never touched).
TEMPLATE_MOUNT_SOURCE = "kata-vmfactory-template"
METADATA_VERSION = 1
# Beside the template, not in it: the template directory is a tmpfs that is
# unmounted and removed, and a lock must outlive both.
LOCK_SUFFIX = ".lock"
# A waiter gives up after this: one creation under TCG on a loaded 2-core
# host takes tens of seconds; several minutes means the holder is stuck.
CREATE_LOCK_TIMEOUT_S = 300.0
# What a template directory may hold, complete or not (a leftover is removed only if this is all).
_TEMPLATE_FILES = {"memory", "state", "metadata.json"}
# ...and the temporary file of an interrupted metadata write (hostos.files.write_atomic).
_METADATA_TMP = re.compile(r"^\.metadata\.json\.[0-9a-f]+\.tmp$")

_TRACER = "kata_vmfactory.factory"
log = logging.getLogger(__name__)


def expected_metadata(config: VMConfig) -> dict[str, Any]:
    """What a clone booted from `config` must share with the template."""
    hv = config.hypervisor
    # The device list as QEMU would get it: a clone with different devices
    # loads without error and the guest never sees the difference.
    probe = cmdline.build(hv, Accelerator("tcg", "max", "metadata"), RunDir(Path("/run-dir"), "metadata"), "metadata")
    devices = [probe[i + 1] for i, a in enumerate(probe) if a == "-device"]
    return {
        "metadata_version": METADATA_VERSION,
        "kernel_sha256": hostfacts.sha256(hv.kernel_path),
        "initrd_sha256": hostfacts.sha256(hv.initrd_path),
        "kernel_params": hv.kernel_params,
        "memory_mib": hv.memory_mib,
        "num_vcpus": hv.num_vcpus,
        "max_vcpus": hv.max_vcpus,
        "memory_slots": hv.memory_slots,
        "max_memory_mib": hv.max_memory_mib,
        "machine": hv.machine,
        "devices": devices,
        "qemu_version": hostfacts.qemu_version(hv.qemu_path),
        # A TCG template's CPU state does not load under KVM, nor the reverse.
        "accelerator": accelerator.choose(hv.accelerator, hv.qemu_path).name,
        "agent_protocol_version": PROTOCOL_VERSION,
    }


def _lock_path(template_path: str) -> str:
    return str(Path(template_path)) + LOCK_SUFFIX


@contextlib.asynccontextmanager
async def creation_lock(path: str) -> AsyncIterator[None]:
    """Serializes making, replacing and destroying the template in `path`, across processes."""
    try:
        async with locks.exclusive_async(_lock_path(path), CREATE_LOCK_TIMEOUT_S):
            yield
    except locks.LockTimeoutError as err:
        raise TemplateError(f"waiting for the VM template in {path}: {err}") from err


class TemplateFactory(FactoryBase):
    def __init__(self, config: VMConfig, path: str, run_root: str = DEFAULT_RUN_ROOT,
                 created: bool = False) -> None:
        self._config = config
        self.path = Path(path)
        self.run_root = run_root
        self.created = created  # this process made it (and so its owner removes it)
        self.punch_report: memfile.PunchReport | None = None
        # How this process got the template (create): for status and metrics.
        self.creation_seconds = 0.0
        self.restored_from = ""  # the template_persist_path it was copied from, if any
        self.persist_error = ""

    @property
    def memory_path(self) -> Path:
        return self.path / "memory"

    @property
    def state_path(self) -> Path:
        return self.path / "state"

    @property
    def metadata_path(self) -> Path:
        return self.path / "metadata.json"

    def config(self) -> VMConfig:
        return self._config

    # ---- create / fetch ---------------------------------------------------

    @classmethod
    async def create(cls, config: VMConfig, path: str = DEFAULT_TEMPLATE_PATH,
                     run_root: str = DEFAULT_RUN_ROOT, ctx: Context | None = None,
                     persist_path: str = "") -> "TemplateFactory":
        """A new template; refuses to replace one that exists (see open_or_create)."""
        async with creation_lock(path):
            if cls(config, path, run_root).exists():
                raise TemplateError(f"There is already a VM template in {path}; "
                                    "remove it with `kata-runtime factory destroy` first")
            return await cls._create_locked(config, path, run_root, ctx, persist_path)

    @classmethod
    async def open_or_create(cls, config: VMConfig, path: str = DEFAULT_TEMPLATE_PATH,
                             run_root: str = DEFAULT_RUN_ROOT, ctx: Context | None = None,
                             persist_path: str = "") -> "TemplateFactory":
        """The template in `path` if it matches `config`, else a new one in its place.

        One creator at a time: the others wait for the lock and then find the
        template made. What a crashed creator left (a half-written tmpfs, its
        boot VM) is cleared first; a template for another config is replaced.
        """
        async with creation_lock(path):
            try:
                return cls.fetch(config, path, run_root)
            except TemplateError as err:
                leftover = cls(config, path, run_root)
                if leftover.path.exists():
                    log.warning("replacing the VM template in %s: %s", path, err)
            return await cls._create_locked(config, path, run_root, ctx, persist_path)

    @classmethod
    async def _create_locked(cls, config: VMConfig, path: str, run_root: str,
                             ctx: Context | None, persist_path: str) -> "TemplateFactory":
        """Makes the template in `path`: restored from `persist_path` when a matching copy is
        saved there, else booted (and then saved there when `persist_path` is set)."""
        self = cls(config, path, run_root, created=True)
        started = time.monotonic()
        with tracing.span(_TRACER, "template.New", ctx, subsystem="factory", path=path) as span_ctx:
            # A creator killed mid-way left its boot VM writing into the memory
            # file; the lock says it is dead, so stop that VM before reusing anything.
            await asyncio.to_thread(reaper.reap, run_root, (OwnerKind.TEMPLATE,))
            await self._clear_leftover()
            try:
                self._prepare_files()
                if not (persist_path and self._restore(Path(persist_path))):
                    await self._boot_and_save(span_ctx)
                    if persist_path:
                        self._persist(Path(persist_path))
            except BaseException:
                await self.close()
                raise
        self.creation_seconds = time.monotonic() - started
        return self

    def _restore(self, store: Path) -> bool:
        why_not = template_store.differences(store, expected_metadata(self._config))
        if why_not:
            log.info("not restoring the template from %s, booting a new one: %s", store, "; ".join(why_not))
            return False
        template_store.restore(store, self.path)
        self.restored_from = str(store)
        return True

    def _persist(self, store: Path) -> None:
        # The tmpfs template works without its disk copy: a failed save costs
        # a boot after the next reboot, not this server.
        try:
            template_store.save(self.path, store)
        except TemplateError as err:
            self.persist_error = str(err)
            log.error("%s", err)

    @classmethod
    def fetch(cls, config: VMConfig, path: str = DEFAULT_TEMPLATE_PATH,
              run_root: str = DEFAULT_RUN_ROOT) -> "TemplateFactory":
        self = cls(config, path, run_root)
        if not self.exists():
            raise TemplateError(f"no VM template in {path} (need {self.memory_path} and {self.state_path}); "
                                "create one with `kata-runtime factory init`")
        try:
            recorded = json.loads(self.metadata_path.read_text())
        except (OSError, ValueError) as err:
            raise TemplateError(f"VM template in {path} has no readable metadata ({err}); "
                                "destroy and re-create it") from err
        expected = expected_metadata(config)
        differences = [f"{key}: template has {recorded.get(key)!r}, config needs {value!r}"
                       for key, value in expected.items() if recorded.get(key) != value]
        if differences:
            raise TemplateError(f"VM template in {path} does not match the configuration; "
                                "run `kata-runtime factory destroy` and `init` again. Differences: "
                                + "; ".join(differences))
        return self

    async def _clear_leftover(self) -> None:
        """Removes a partial or stale template; never a directory holding anything else, nor a
        mount or symlink someone else put at template_path."""
        if self.path.is_symlink() or self.path.exists():
            self._refuse_foreign_mount()
        try:
            names = set(os.listdir(self.path))
        except FileNotFoundError:
            return
        foreign = {name for name in names - _TEMPLATE_FILES if not _METADATA_TMP.match(name)}
        if foreign:
            raise TemplateError(f"{self.path} holds files that are not a VM template's ({', '.join(sorted(foreign))}); "
                                "set factory.template_path to a directory of its own")
        await self.close()

    def exists(self) -> bool:
        return self.memory_path.is_file() and self.state_path.is_file()

    def _prepare_files(self) -> None:
        try:
            self.path.mkdir(mode=0o700, parents=True, exist_ok=True)
            self._refuse_foreign_mount()
            if not mounts.is_mountpoint(str(self.path)):
                mounts.mount_tmpfs(str(self.path), self._config.hypervisor.memory_mib + DEVICE_STATE_MIB,
                                   source=TEMPLATE_MOUNT_SOURCE)
            fd = os.open(self.memory_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC,
                         0o600)
            with os.fdopen(fd, "wb") as f:
                f.truncate(self._config.hypervisor.memory_mib * 1024 * 1024)
        except OSError as err:
            raise TemplateError(f"cannot prepare the VM template in {self.path}: {err}; check "
                                "factory.template_path (a tmpfs is mounted there, which needs root)") from err

    def _ours_mounted(self) -> bool:
        """Whether template_path is a mount this project made (its tmpfs, by source name)."""
        top = mountinfo.top_mount_at(os.path.abspath(self.path))
        return top is not None and top.source == TEMPLATE_MOUNT_SOURCE

    def _refuse_foreign_mount(self) -> None:
        if self.path.is_symlink():
            raise TemplateError(f"template_path {self.path} is a symlink; name the directory itself")
        if mounts.is_mountpoint(str(self.path)) and not self._ours_mounted():
            raise TemplateError(f"template_path {self.path} is already a mount point that kata-vmfactory did not "
                                "make; choose an unused directory for template_path (it is never unmounted or emptied)")

    async def _boot_and_save(self, ctx: Context | None) -> None:
        hv = dataclasses.replace(self._config.hypervisor, boot_to_be_template=True, boot_from_template=False,
                                 memory_path=str(self.memory_path), devices_state_path=str(self.state_path))
        with ownership.acting_as(OwnerKind.TEMPLATE):
            vm = await VM.new(dataclasses.replace(self._config, hypervisor=hv), self.run_root, ctx)
        try:
            # The guest agent sees the host leave before the snapshot, so every
            # clone starts from "no host connected" and accepts its new owner.
            await vm.agent.close()
            await vm.pause(ctx)
            await vm.save(str(self.state_path), ctx)
        finally:
            # Saved once, the template must never run again: running would
            # write into the shared memory file under every clone's feet.
            await vm.stop(ctx)
        self.punch_report = memfile.punch_zero_pages(str(self.memory_path))
        log.info("template %s: %d pages scanned, %d zero pages freed (%.1f MiB)", self.path,
                 self.punch_report.pages_scanned, self.punch_report.zero_pages_freed, self.punch_report.mib_saved)
        # Last and atomic: metadata present means the template is complete.
        files.write_atomic(str(self.metadata_path), json.dumps(expected_metadata(self._config), indent=1,
                                                               sort_keys=True).encode())

    # ---- clones -------------------------------------------------------------

    def clone_config(self) -> VMConfig:
        hv = dataclasses.replace(self._config.hypervisor, boot_to_be_template=False, boot_from_template=True,
                                 memory_path=str(self.memory_path), devices_state_path=str(self.state_path))
        return dataclasses.replace(self._config, hypervisor=hv)

    async def get_base_vm(self, config: VMConfig, ctx: Context | None = None) -> VM:
        with tracing.span(_TRACER, "template.GetBaseVM", ctx, subsystem="factory") as span_ctx:
            # The template's config, not the request's: a clone is what the template was.
            return await VM.new(self.clone_config(), self.run_root, span_ctx)

    async def close(self, ctx: Context | None = None) -> None:
        """Unmounts (lazily) and removes the template; errors are logged, as upstream."""
        if self.path.is_symlink():
            log.warning("not removing template %s: it is a symlink kata-vmfactory did not make", self.path)
            return
        if mounts.is_mountpoint(str(self.path)):
            if not self._ours_mounted():
                log.warning("not removing template %s: it is a mount point kata-vmfactory did not make", self.path)
                return
            try:
                mounts.unmount_lazy(str(self.path))
            except OSError as err:
                log.warning("failed to unmount %s: %s", self.path, err)
        try:
            safetree.remove_tree(str(self.path))
        except OSError as err:
            log.warning("failed to remove %s: %s", self.path, err)

    @classmethod
    async def destroy(cls, config: VMConfig, path: str = DEFAULT_TEMPLATE_PATH) -> bool:
        """Removes the template in `path` (unmounting its tmpfs) once no one is creating it.

        No fetch: it would refuse a template made for another config, which is
        exactly one worth destroying. True when there was something to remove.
        """
        async with creation_lock(path):
            template = cls(config, path)
            existed = template.path.exists()
            if existed:
                await template.close()
            # Nothing left behind, not even the lock file: a waiter that
            # opened it will notice it is unlinked and take a new one.
            try:
                os.unlink(_lock_path(path))
            except FileNotFoundError:
                pass
            return existed

    def details(self) -> dict[str, Any]:
        info: dict[str, Any] = {"strategy": "template", "path": str(self.path)}
        try:
            info["metadata"] = json.loads(self.metadata_path.read_text())
            info["memory"] = memfile.residency(str(self.memory_path))
        except (OSError, ValueError):
            pass
        if self.punch_report:
            info["zero_pages_freed"] = self.punch_report.zero_pages_freed
        if self.created:
            info.update(creation_seconds=self.creation_seconds, restored_from=self.restored_from,
                        persist_error=self.persist_error)
        return info
