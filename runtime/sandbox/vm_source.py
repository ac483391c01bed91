"""Where a sandbox's VM comes from: VMCache, else the template, else a direct boot.

Sandbox creation never fails only because VMCache is down or a template is
missing: each fallback is logged as a warning and recorded.
"""
from __future__ import annotations

import dataclasses
import logging

from opentelemetry.context import Context

from configuration.loader import RuntimeConfig
from factory.errors import FactoryError
from factory.factory import Factory, Mode, new_factory
from factory.template import TemplateFactory

log = logging.getLogger(__name__)


async def open_factory(config: RuntimeConfig, ctx: Context | None = None) -> tuple[Factory, str, list[str]]:
    """(factory, path name, warnings) for one sandbox creation."""
    warnings: list[str] = []
    if config.vm_cache_number > 0:
        try:
            return await new_factory(config.factory_config(), ctx=ctx), "vmcache", warnings
        except FactoryError as err:
            warnings.append(f"VMCache unavailable, using the local factory: {err}")
    local = config.factory_config(config.local_mode())
    if config.enable_template:
        try:
            return await new_factory(local, fetch_only=True, ctx=ctx), "template", warnings
        except FactoryError as fetch_err:
            why: FactoryError = fetch_err
            if not TemplateFactory(local.vm_config, local.template_path).exists():
                try:
                    # The first sandbox makes the template (as Kata 1.x does),
                    # under the template's lock: if the server or another
                    # sandbox is making it, this waits and then shares theirs.
                    factory = await new_factory(local, fetch_only=False, ctx=ctx)
                    return factory, "template (created)", warnings
                except FactoryError as create_err:
                    why = create_err
            warnings.append(f"VM template unusable, booting directly: {why}")
    direct = dataclasses.replace(local, mode=Mode.DIRECT, template=False)
    return await new_factory(direct, ctx=ctx), "direct", warnings
