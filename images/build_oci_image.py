"""Builds a busybox OCI image archive from Debian's busybox-static: no registry, no download.

build_oci_image.py --busybox /bin/busybox --name kata-busybox:latest --out busybox-oci.tar

The archive is an OCI image layout (oci-layout, index.json, blobs/sha256/...) with one layer, which
`ctr images import` reads, plus the docker-archive `manifest.json` naming the same blobs, which
`docker load` reads (dockerd 20.10 knows no OCI layout; newer `docker save` writes both the same way).
Byte-reproducible: every mtime is 0, owners are root, entries are sorted, gzip carries no name or time.
"""
from __future__ import annotations

import argparse
import gzip
import hashlib
import io
import json
import subprocess
import tarfile

MANIFEST_TYPE = "application/vnd.oci.image.manifest.v1+json"
CONFIG_TYPE = "application/vnd.oci.image.config.v1+json"
LAYER_TYPE = "application/vnd.oci.image.layer.v1.tar+gzip"
DIRECTORIES = ("bin", "dev", "etc", "proc", "root", "sys", "tmp")
FILES = {
    "etc/passwd": b"root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/:/bin/false\n",
    "etc/group": b"root:x:0:\nnogroup:x:65534:\n",
    "etc/hostname": b"kata\n",
}


def _entry(name: str, kind: bytes, mode: int, size: int = 0, link: str = "") -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type, info.mode, info.size, info.linkname = kind, mode, size, link
    info.mtime, info.uid, info.gid, info.uname, info.gname = 0, 0, 0, "root", "root"
    return info


def layer_tar(busybox: bytes, applets: list[str]) -> bytes:
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name in DIRECTORIES:
            tar.addfile(_entry(name, tarfile.DIRTYPE, 0o1777 if name == "tmp" else 0o755))
        tar.addfile(_entry("bin/busybox", tarfile.REGTYPE, 0o755, len(busybox)), io.BytesIO(busybox))
        for applet in sorted(set(applets) - {"busybox"}):
            tar.addfile(_entry(f"bin/{applet}", tarfile.SYMTYPE, 0o777, link="busybox"))
        for name, data in sorted(FILES.items()):
            tar.addfile(_entry(name, tarfile.REGTYPE, 0o644, len(data)), io.BytesIO(data))
    return out.getvalue()


def _blob(data: bytes) -> tuple[str, bytes]:
    return "sha256:" + hashlib.sha256(data).hexdigest(), data


def image_archive(busybox: bytes, applets: list[str], name: str) -> bytes:
    layer = layer_tar(busybox, applets)
    layer_gz = gzip.compress(layer, mtime=0)
    layer_digest, _ = _blob(layer_gz)
    config = json.dumps({
        "architecture": "amd64", "os": "linux", "created": "1970-01-01T00:00:00Z",
        "config": {"Env": ["PATH=/bin"], "Cmd": ["sh"], "WorkingDir": "/"},
        "rootfs": {"type": "layers", "diff_ids": ["sha256:" + hashlib.sha256(layer).hexdigest()]},
        "history": [{"created": "1970-01-01T00:00:00Z", "created_by": "images/build_oci_image.py"}],
    }, sort_keys=True).encode()
    config_digest, _ = _blob(config)
    manifest = json.dumps({
        "schemaVersion": 2, "mediaType": MANIFEST_TYPE,
        "config": {"mediaType": CONFIG_TYPE, "digest": config_digest, "size": len(config)},
        "layers": [{"mediaType": LAYER_TYPE, "digest": layer_digest, "size": len(layer_gz)}],
    }, sort_keys=True).encode()
    manifest_digest, _ = _blob(manifest)
    repository, _, tag = name.rpartition(":")
    index = json.dumps({"schemaVersion": 2, "manifests": [{
        "mediaType": MANIFEST_TYPE, "digest": manifest_digest, "size": len(manifest),
        # ctr names the imported image from io.containerd.image.name; other tools read ref.name.
        "annotations": {"io.containerd.image.name": _qualified(repository) + ":" + tag,
                        "org.opencontainers.image.ref.name": tag},
    }]}, sort_keys=True).encode()
    # docker load's own index: blob paths and the tag it gives the image (docker.io/library/ is implied).
    docker_manifest = json.dumps([{
        "Config": "blobs/sha256/" + config_digest.split(":")[1], "RepoTags": [name],
        "Layers": ["blobs/sha256/" + layer_digest.split(":")[1]],
    }], sort_keys=True).encode()
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=tarfile.PAX_FORMAT) as tar:
        tar.addfile(_entry("blobs", tarfile.DIRTYPE, 0o755))
        tar.addfile(_entry("blobs/sha256", tarfile.DIRTYPE, 0o755))
        for digest, data in sorted([(config_digest, config), (layer_digest, layer_gz), (manifest_digest, manifest)]):
            tar.addfile(_entry("blobs/sha256/" + digest.split(":")[1], tarfile.REGTYPE, 0o644, len(data)),
                        io.BytesIO(data))
        for fname, data in (("index.json", index), ("manifest.json", docker_manifest),
                            ("oci-layout", b'{"imageLayoutVersion":"1.0.0"}')):
            tar.addfile(_entry(fname, tarfile.REGTYPE, 0o644, len(data)), io.BytesIO(data))
    return out.getvalue()


def _qualified(repository: str) -> str:
    """containerd's normalised name: docker.io/library/NAME for a bare name, as `ctr` expects."""
    if "/" not in repository:
        return "docker.io/library/" + repository
    return repository


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--busybox", default="/bin/busybox")
    parser.add_argument("--name", default="kata-busybox:latest")
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    applets = subprocess.run([args.busybox, "--list"], capture_output=True, text=True, check=True).stdout.split()
    with open(args.busybox, "rb") as f:
        busybox = f.read()
    with open(args.out, "wb") as f:
        f.write(image_archive(busybox, applets, args.name))


if __name__ == "__main__":
    main()
