"""Where a sandbox's VM comes from when VMCache or the template cannot serve it (no VM booted)."""
from __future__ import annotations

import asyncio

from configuration import loader
from factory.errors import TemplateError
from factory.factory import FactoryConfig, Mode
from runtime.sandbox import vm_source


def test_a_template_that_does_not_fit_falls_back_to_a_direct_boot_and_says_why(monkeypatch):
    config = loader.parse('[factory]\nenable_template = true\ntemplate_path = "/nonexistent/template"\n')
    asked: list[FactoryConfig] = []

    async def new_factory(factory_config: FactoryConfig, fetch_only: bool = False, ctx=None):
        asked.append(factory_config)
        if factory_config.mode is Mode.TEMPLATE:
            raise TemplateError("VM template in /nonexistent/template does not match the configuration")
        return "direct factory"

    # The template is there (so no sandbox may replace it) but made for another configuration.
    monkeypatch.setattr(vm_source, "new_factory", new_factory)
    monkeypatch.setattr(vm_source.TemplateFactory, "exists", lambda self: True)
    factory, path, warnings = asyncio.run(vm_source.open_factory(config))
    assert (factory, path) == ("direct factory", "direct")
    assert warnings == ["VM template unusable, booting directly: VM template in /nonexistent/template does not "
                        "match the configuration"]
    assert [(c.mode, c.template) for c in asked] == [(Mode.TEMPLATE, True), (Mode.DIRECT, False)]
