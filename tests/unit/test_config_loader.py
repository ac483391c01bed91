"""configuration.toml: lookup order, strict schema, errors naming key, value and file."""
import pytest

from configuration import loader
from factory.errors import ConfigError
from factory.factory import FactoryConfig, Mode


def test_built_in_configuration_is_valid_and_used_when_nothing_else_exists(monkeypatch):
    monkeypatch.delenv("KATA_CONF_FILE", raising=False)
    monkeypatch.setattr(loader, "DEFAULT_LOCATIONS", ())
    config = loader.load()
    assert config.path == loader.EMBEDDED
    assert config.vm_cache_endpoint == "/var/run/kata-containers/cache.sock"
    assert config.template_path == "/run/vc/vm/template"
    assert config.vm_config.hypervisor.machine == "q35"
    assert config.disable_guest_seccomp is True


def test_lookup_order_is_flag_then_environment(tmp_path, monkeypatch):
    flag, env = tmp_path / "flag.toml", tmp_path / "env.toml"
    flag.write_text("[factory]\nvm_cache_number = 3\n")
    env.write_text("[factory]\nvm_cache_number = 5\n")
    monkeypatch.setenv("KATA_CONF_FILE", str(env))
    assert loader.load(str(flag)).vm_cache_number == 3
    assert loader.load().vm_cache_number == 5


def test_one_explicit_factory_mode_follows_from_the_configuration():
    assert loader.parse("[factory]\nvm_cache_number = 2\n").factory_config().mode is Mode.VMCACHE_CLIENT
    assert loader.parse("[factory]\nenable_template = true\n").factory_config().mode is Mode.TEMPLATE
    assert loader.parse("").factory_config().mode is Mode.DIRECT
    pool = loader.parse("[factory]\nvm_cache_number = 3\n").factory_config(Mode.VMCACHE_POOL)
    assert (pool.mode, pool.cache) == (Mode.VMCACHE_POOL, 3)


@pytest.mark.parametrize("fields, message", [
    (dict(mode=Mode.CACHE), "a cache needs cache > 0"),
    (dict(mode=Mode.TEMPLATE, cache=2), "only cache and vmcache-pool keep VMs"),
    (dict(mode=Mode.DIRECT, template=True), "use mode template"),
])
def test_a_factory_mode_that_contradicts_its_fields_is_refused(fields, message):
    with pytest.raises(ConfigError, match=message):
        FactoryConfig(**fields)


def test_unset_or_zero_cache_number_disables_vmcache():
    assert loader.parse("[factory]\n").vm_cache_number == 0
    config = loader.parse("[factory]\nvm_cache_number = 0\n")
    assert config.factory_config().mode is not Mode.VMCACHE_CLIENT


@pytest.mark.parametrize("text,message", [
    ("[factory]\nvm_cache_numbr = 2\n", "x.toml: unknown key(s) in [factory]: vm_cache_numbr"),
    ("[factory]\nvm_cache_number = \"2\"\n", "x.toml: factory.vm_cache_number = '2' must be a int"),
    ("[factory]\nvm_cache_number = -1\n", "vm_cache_number = -1 must be between 0 and 64"),
    ("[factory]\nvm_cache_number = 100000\n", "vm_cache_number = 100000 must be between 0 and 64"),
    ("[factory]\nenable_template = 1\n", "factory.enable_template = 1 must be a bool"),
    ("[factory]\ntemplate_path = \"relative/dir\"\n", "template_path = 'relative/dir' must be an absolute path"),
    ("[hypervisor.qemu]\ndefault_memory = 16\n", "x.toml: hypervisor memory_mib 16 is below"),
    ("[hypervisor.qemu]\naccelerator = \"hvf\"\n", "accelerator 'hvf' is not one of auto, kvm, tcg"),
    ("[hypervisor.firecracker]\n", "unknown key(s) in [hypervisor]: firecracker"),
    ("[bogus]\n", "unknown section(s): bogus"),
    ("[factory\n", "x.toml: not valid TOML"),
    ("[factory]\nvm_cache_client_uids = 1000\n", "factory.vm_cache_client_uids = 1000 must be a list"),
    ("[factory]\nvm_cache_client_uids = [\"alice\"]\n",
     "factory.vm_cache_client_uids has 'alice'; list numeric user IDs"),
])
def test_bad_configs_name_the_key_value_and_file(text, message):
    with pytest.raises(ConfigError,
                       match=message.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[").replace("]", r"\]")):
        loader.parse(text, "x.toml")


def test_vmcache_client_uids_are_read_and_empty_by_default():
    assert loader.parse("", "x.toml").vm_cache_client_uids == ()
    config = loader.parse("[factory]\nvm_cache_client_uids = [1000, 1001]\n", "x.toml")
    assert config.vm_cache_client_uids == (1000, 1001)


def test_a_missing_config_file_is_named():
    with pytest.raises(ConfigError, match="cannot read configuration /nonexistent.toml \\(from --config\\)"):
        loader.load("/nonexistent.toml")


def test_guest_seccomp_is_disabled_by_default_as_upstream():
    assert loader.parse("", "x.toml").disable_guest_seccomp is True
    assert loader.parse("[runtime]\ndisable_guest_seccomp = false\n", "x.toml").disable_guest_seccomp is False
    with pytest.raises(ConfigError, match="runtime.disable_guest_seccomp = 'no' must be a bool"):
        loader.parse("[runtime]\ndisable_guest_seccomp = 'no'\n", "x.toml")
