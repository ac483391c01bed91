"""tools/guest_kernel.py: the pin file and when a cached kernel counts as the pinned one (no apt)."""
import json

import pytest

from tools import guest_kernel

PIN = {"package": "linux-image-6.1.0-57-amd64", "version": "6.1.192-3", "deb_sha256": "ab" * 32}


def test_the_repository_pin_is_complete():
    pin = guest_kernel.read_pin()
    assert pin["package"].startswith("linux-image-") and pin["version"]
    assert len(pin["deb_sha256"]) == 64 and int(pin["deb_sha256"], 16) >= 0


def test_a_pin_without_a_digest_is_refused_with_the_remedy(tmp_path):
    pin_file = tmp_path / "pin.json"
    pin_file.write_text(json.dumps({"package": PIN["package"], "version": PIN["version"]}))
    with pytest.raises(guest_kernel.KernelError, match=r"lacks deb_sha256.*--repin"):
        guest_kernel.read_pin(pin_file)


@pytest.mark.parametrize("cached, matches", [
    (dict(PIN), True),
    # unpacked before digests were recorded: same package and version is the same .deb
    ({"package": PIN["package"], "version": PIN["version"]}, True),
    (dict(PIN, version="6.1.192-2"), False),
    (dict(PIN, package="linux-image-6.1.0-56-amd64"), False),
    (dict(PIN, deb_sha256="cd" * 32), False),
    (None, False),
])
def test_a_cached_kernel_matches_only_the_pinned_package(cached, matches):
    assert guest_kernel.matches_pin(cached, PIN) is matches
