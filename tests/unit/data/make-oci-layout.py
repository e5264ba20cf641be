#!/usr/bin/python3
"""Writes a small OCI image layout for the pull tests.

usage: make-oci-layout.py DIR TAG [--layers N] [--user USER] [--seed S] [--arch ARCH[/VARIANT]]...
                          [--layer-bytes N] [--bad-diff-id I] [--multi-member] [--config-empty-objects N]
                          [--config-array]

With one --arch (default amd64) the tag names an image manifest; with several it names an image index holding one
manifest per architecture. Layer contents are derived from the seed, tag and architecture, so the digests are stable.
--layer-bytes adds N incompressible (seeded pseudo-random) bytes to every layer; --bad-diff-id I writes a wrong
rootfs.diff_ids[I] into the config (a layer whose content is not what the config says); --multi-member writes every
layer as two concatenated gzip members (RFC 1952 allows it; pigz and some builders produce such streams).
--config-empty-objects N adds a list of N empty objects to the config (cheap to send, costly to parse);
--config-array writes the config as a JSON array holding what would be the config (not an image config).
"""
import argparse
import gzip
import hashlib
import io
import json
import os
import random
import tarfile


def put_blob(layout, data):
    digest = hashlib.sha256(data).hexdigest()
    path = os.path.join(layout, "blobs", "sha256", digest)
    with open(path, "wb") as f:
        f.write(data)
    return {"digest": "sha256:" + digest, "size": len(data)}


def make_layer(seed, i, extra=0, multi=False):
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w", format=tarfile.PAX_FORMAT) as tar:
        content = ("%s layer %d\n" % (seed, i)).encode() * (50 + 20 * i)
        if extra:
            content += random.Random("%s-%d" % (seed, i)).randbytes(extra)
        info = tarfile.TarInfo("file-%d.txt" % i)
        info.size = len(content)
        info.mtime = 0
        tar.addfile(info, io.BytesIO(content))
    tarbytes = raw.getvalue()
    if multi:
        half = len(tarbytes) // 2
        return (gzip.compress(tarbytes[:half], mtime=0) + gzip.compress(tarbytes[half:], mtime=0),
                "sha256:" + hashlib.sha256(tarbytes).hexdigest())
    return gzip.compress(tarbytes, mtime=0), "sha256:" + hashlib.sha256(tarbytes).hexdigest()


def make_image(layout, tag, arch, layers, user, seed, extra=0, bad_diff_id=-1, multi=False, empty_objects=0,
               config_array=False):
    parts = arch.split("/")
    seed = "%s-%s-%s" % (seed, tag, arch)
    descs, diff_ids = [], []
    for i in range(layers):
        blob, diff_id = make_layer(seed, i, extra, multi)
        if i == bad_diff_id:
            diff_id = "sha256:" + hashlib.sha256(b"not this layer").hexdigest()
        d = put_blob(layout, blob)
        d["mediaType"] = "application/vnd.oci.image.layer.v1.tar+gzip"
        descs.append(d)
        diff_ids.append(diff_id)
    config = {
        "architecture": parts[0],
        "os": "linux",
        "config": {"User": user} if user else {},
        "rootfs": {"type": "layers", "diff_ids": diff_ids},
    }
    if len(parts) > 1:
        config["variant"] = parts[1]
    if empty_objects:
        config["junk"] = [{}] * empty_objects
    cdesc = put_blob(layout, json.dumps([config] if config_array else config, sort_keys=True,
                                        separators=(",", ":")).encode())
    cdesc["mediaType"] = "application/vnd.oci.image.config.v1+json"
    manifest = {
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": cdesc,
        "layers": descs,
    }
    mdesc = put_blob(layout, json.dumps(manifest, sort_keys=True).encode())
    mdesc["mediaType"] = "application/vnd.oci.image.manifest.v1+json"
    platform = {"architecture": parts[0], "os": "linux"}
    if len(parts) > 1:
        platform["variant"] = parts[1]
    return mdesc, platform


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("dir")
    ap.add_argument("tag")
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--user", default="")
    ap.add_argument("--arch", action="append")
    ap.add_argument("--seed", default="", help="varies the layer contents (e.g. the repository name)")
    ap.add_argument("--layer-bytes", type=int, default=0)
    ap.add_argument("--bad-diff-id", type=int, default=-1)
    ap.add_argument("--multi-member", action="store_true")
    ap.add_argument("--config-empty-objects", type=int, default=0)
    ap.add_argument("--config-array", action="store_true")
    a = ap.parse_args()
    arches = a.arch or ["amd64"]
    os.makedirs(os.path.join(a.dir, "blobs", "sha256"), exist_ok=True)
    with open(os.path.join(a.dir, "oci-layout"), "w") as f:
        json.dump({"imageLayoutVersion": "1.0.0"}, f)
    if len(arches) == 1:
        top, _ = make_image(a.dir, a.tag, arches[0], a.layers, a.user, a.seed, a.layer_bytes, a.bad_diff_id, a.multi_member,
                            a.config_empty_objects, a.config_array)
    else:
        entries = []
        for arch in arches:
            d, platform = make_image(a.dir, a.tag, arch, a.layers, a.user, a.seed, a.layer_bytes, a.bad_diff_id, a.multi_member)
            d["platform"] = platform
            entries.append(d)
        index = {"schemaVersion": 2, "mediaType": "application/vnd.oci.image.index.v1+json", "manifests": entries}
        top = put_blob(a.dir, json.dumps(index, sort_keys=True).encode())
        top["mediaType"] = "application/vnd.oci.image.index.v1+json"
    top["annotations"] = {"org.opencontainers.image.ref.name": a.tag}
    with open(os.path.join(a.dir, "index.json"), "w") as f:
        json.dump({"schemaVersion": 2, "mediaType": "application/vnd.oci.image.index.v1+json", "manifests": [top]}, f)


if __name__ == "__main__":
    main()
