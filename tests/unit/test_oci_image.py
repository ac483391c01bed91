"""The busybox OCI image archive: a valid image layout whose digests and sizes all match."""
from __future__ import annotations

import gzip
import hashlib
import io
import json
import tarfile
from pathlib import Path

from images.build_oci_image import image_archive

BUSYBOX = b"\x7fELF not really busybox"


def _blobs(archive: bytes) -> tuple[dict[str, bytes], dict, tarfile.TarFile]:
    tar = tarfile.open(fileobj=io.BytesIO(archive))
    files = {m.name: tar.extractfile(m).read() for m in tar.getmembers() if m.isfile()}
    return files, json.loads(files["index.json"]), tar


def _get(files: dict[str, bytes], descriptor: dict) -> bytes:
    data = files["blobs/sha256/" + descriptor["digest"].split(":")[1]]
    assert "sha256:" + hashlib.sha256(data).hexdigest() == descriptor["digest"]
    assert len(data) == descriptor["size"]
    return data


def test_every_descriptor_matches_its_blob_and_the_layer_holds_busybox_and_its_applets():
    files, index, _ = _blobs(image_archive(BUSYBOX, ["sh", "uname", "busybox"], "kata-busybox:latest"))
    assert json.loads(files["oci-layout"]) == {"imageLayoutVersion": "1.0.0"}
    (entry,) = index["manifests"]
    assert entry["annotations"]["io.containerd.image.name"] == "docker.io/library/kata-busybox:latest"
    manifest = json.loads(_get(files, entry))
    config = json.loads(_get(files, manifest["config"]))
    (layer_descriptor,) = manifest["layers"]
    layer = gzip.decompress(_get(files, layer_descriptor))
    assert config["rootfs"]["diff_ids"] == ["sha256:" + hashlib.sha256(layer).hexdigest()]
    rootfs = tarfile.open(fileobj=io.BytesIO(layer))
    assert rootfs.extractfile("bin/busybox").read() == BUSYBOX
    assert rootfs.getmember("bin/sh").linkname == "busybox"
    assert {m.mtime for m in rootfs.getmembers()} == {0}


def test_the_archive_is_byte_reproducible():
    assert image_archive(BUSYBOX, ["sh"], "x:1") == image_archive(BUSYBOX, ["sh"], "x:1")


def test_the_bazel_target_built_an_archive_with_the_real_busybox():
    files, index, _ = _blobs(Path("images/busybox-oci.tar").read_bytes())
    manifest = json.loads(_get(files, index["manifests"][0]))
    layer = gzip.decompress(_get(files, manifest["layers"][0]))
    assert tarfile.open(fileobj=io.BytesIO(layer)).getmember("bin/busybox").size > 500_000


def test_docker_loads_the_same_blobs_from_its_manifest_json():
    files, index, _ = _blobs(image_archive(BUSYBOX, ["sh"], "kata-busybox:latest"))
    manifest = json.loads(_get(files, index["manifests"][0]))
    (docker,) = json.loads(files["manifest.json"])
    assert docker["RepoTags"] == ["kata-busybox:latest"]
    assert docker["Config"] == "blobs/sha256/" + manifest["config"]["digest"].split(":")[1]
    assert docker["Layers"] == ["blobs/sha256/" + d["digest"].split(":")[1] for d in manifest["layers"]]
