"""The layer unpacker against Debian's umoci as the oracle.

Each fixture is an OCI image layout of several layers (gzip, zstd and plain tar) built here with Python's tarfile:
whiteouts, opaque directories, hard links, symlinks, devices, fifos, setuid files, owners, xattrs and many small files.
umoci unpacks the image the sequential way (one rootfs, layers applied in order); it gets the zstd and Docker layers as OCI
gzip (the same tars) because Debian 12's umoci 0.4.7 reads neither. crimage's unpacker
(build/tests/unit/unpack-tool) extracts every layer into a directory of its own, and an overlay mount of those
directories (read-only, lowerdir only) is the rootfs. Both trees must be equal file by file: names, types, modes,
owners, sizes, contents, link targets, device numbers, xattrs (trusted.overlay.* excluded: overlayfs hides them),
mtimes of non-directories and hard-link groups. Where overlay mounts are not possible, the layers are merged here
with overlayfs' rules instead. Needs root, umoci and zstd."""

import hashlib
import io
import json
import os
import shutil
import stat
import subprocess
import tarfile

import pytest

from conftest import build_dir

CAP_NET_RAW = bytes([0x01, 0x00, 0x00, 0x02, 0x00, 0x20, 0x00, 0x00] + [0] * 12)
MTIME = 1600000000

pytestmark = [
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root (owners, devices, overlay mounts)"),
    pytest.mark.skipif(not shutil.which("umoci"), reason="umoci is not installed"),
    pytest.mark.skipif(not shutil.which("zstd"), reason="zstd is not installed"),
]


# ---- building layers ----

def entry(name, kind="file", data=b"", mode=None, uid=0, gid=0, target="", xattrs=None, dev=(0, 0), mtime=MTIME):
    return dict(name=name, kind=kind, data=data, mode=mode, uid=uid, gid=gid, target=target, xattrs=xattrs or {},
                dev=dev, mtime=mtime)


def make_tar(entries):
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for e in entries:
            info = tarfile.TarInfo(e["name"])
            info.uid, info.gid, info.mtime = e["uid"], e["gid"], e["mtime"]
            kind = e["kind"]
            data = None
            if kind == "file":
                info.type, info.mode = tarfile.REGTYPE, 0o644
                info.size = len(e["data"])
                data = io.BytesIO(e["data"])
            elif kind == "dir":
                info.type, info.mode = tarfile.DIRTYPE, 0o755
            elif kind == "symlink":
                info.type, info.mode, info.linkname = tarfile.SYMTYPE, 0o777, e["target"]
            elif kind == "hardlink":
                info.type, info.mode, info.linkname = tarfile.LNKTYPE, 0o644, e["target"]
            elif kind == "chr":
                info.type, info.mode = tarfile.CHRTYPE, 0o666
                info.devmajor, info.devminor = e["dev"]
            elif kind == "fifo":
                info.type, info.mode = tarfile.FIFOTYPE, 0o644
            if e["mode"] is not None:
                info.mode = e["mode"]
            if e["xattrs"]:
                # binary values go through as bytes (tarfile then writes hdrcharset=BINARY)
                info.pax_headers = {"SCHILY.xattr." + k: v.decode("utf-8", "surrogateescape")
                                    for k, v in e["xattrs"].items()}
            tar.addfile(info, data)
    return raw.getvalue()


def compress(tar, how, workdir):
    if how == "gzip":
        import gzip
        return gzip.compress(tar, mtime=0), "application/vnd.oci.image.layer.v1.tar+gzip"
    if how == "docker-gzip":
        import gzip
        return gzip.compress(tar, mtime=0), "application/vnd.docker.image.rootfs.diff.tar.gzip"
    if how == "zstd":
        src = os.path.join(workdir, "layer.tar")
        with open(src, "wb") as f:
            f.write(tar)
        subprocess.run(["zstd", "-q", "-f", "-3", src, "-o", src + ".zst"], check=True)
        with open(src + ".zst", "rb") as f:
            return f.read(), "application/vnd.oci.image.layer.v1.tar+zstd"
    return tar, "application/vnd.oci.image.layer.v1.tar"


def put_blob(layout, data):
    digest = hashlib.sha256(data).hexdigest()
    with open(os.path.join(layout, "blobs", "sha256", digest), "wb") as f:
        f.write(data)
    return "sha256:" + digest, len(data)


def write_layout(layout, tag, layers, workdir, no_zstd=False):
    """layers: [(entries, compression)]. Returns [(media type, blob path, diff_id)]. no_zstd: zstd and Docker
    layers are written as OCI gzip instead (the same tar, so the same diff_id), for Debian 12's umoci 0.4.7, which
    reads neither."""
    os.makedirs(os.path.join(layout, "blobs", "sha256"))
    with open(os.path.join(layout, "oci-layout"), "w") as f:
        json.dump({"imageLayoutVersion": "1.0.0"}, f)
    descs, diff_ids, out = [], [], []
    for entries, how in layers:
        tar = make_tar(entries)
        blob, mt = compress(tar, "gzip" if no_zstd and how in ("zstd", "docker-gzip") else how, workdir)
        digest, size = put_blob(layout, blob)
        diff_id = "sha256:" + hashlib.sha256(tar).hexdigest()
        descs.append({"mediaType": mt, "digest": digest, "size": size})
        diff_ids.append(diff_id)
        out.append((mt, os.path.join(layout, "blobs", "sha256", digest.split(":")[1]), diff_id))
    config = json.dumps({"architecture": "amd64", "os": "linux", "config": {},
                         "rootfs": {"type": "layers", "diff_ids": diff_ids}}).encode()
    cdigest, csize = put_blob(layout, config)
    manifest = json.dumps({"schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
                           "config": {"mediaType": "application/vnd.oci.image.config.v1+json",
                                      "digest": cdigest, "size": csize},
                           "layers": descs}).encode()
    mdigest, msize = put_blob(layout, manifest)
    with open(os.path.join(layout, "index.json"), "w") as f:
        json.dump({"schemaVersion": 2, "manifests": [
            {"mediaType": "application/vnd.oci.image.manifest.v1+json", "digest": mdigest, "size": msize,
             "annotations": {"org.opencontainers.image.ref.name": tag}}]}, f)
    return out


# ---- fixtures: each a list of layers ----

def base_layer(n_small):
    e = [entry("./", "dir"),
         entry("bin/", "dir"), entry("bin/busybox", data=b"\x7fELF busybox" * 50, mode=0o755),
         entry("bin/sh", "symlink", target="busybox"), entry("bin/ls", "hardlink", target="bin/busybox"),
         entry("bin/su", data=b"su", mode=0o4755), entry("bin/wall", data=b"wall", mode=0o2755, gid=5),
         entry("bin/ping", data=b"ping", mode=0o755, xattrs={"security.capability": CAP_NET_RAW}),
         entry("etc/", "dir"), entry("etc/passwd", data=b"root:x:0:0::/root:/bin/sh\n"),
         entry("etc/shadow", data=b"root:*::::::\n", mode=0o640, gid=42),
         entry("etc/motd", data=b"welcome\n"), entry("etc/hostname", data=b"base\n"),
         entry("etc/ssl/", "dir"), entry("etc/ssl/certs/", "dir"),
         entry("etc/ssl/certs/ca.pem", data=b"-----BEGIN CERTIFICATE-----\n"),
         entry("tmp/", "dir", mode=0o1777),
         entry("home/", "dir"), entry("home/user/", "dir", mode=0o700, uid=1000, gid=1000),
         entry("home/user/.profile", data=b"export PS1\n", uid=1000, gid=1000, mode=0o600,
               xattrs={"user.note": b"hello"}),
         entry("dev/", "dir"), entry("dev/null", "chr", dev=(1, 3)), entry("dev/zero", "chr", dev=(1, 5)),
         entry("run/", "dir"), entry("run/initctl", "fifo", mode=0o600),
         entry("var/", "dir"), entry("var/cache/", "dir"), entry("var/cache/apt/", "dir"),
         entry("var/cache/apt/pkgcache.bin", data=b"cache" * 1000),
         entry("var/cache/apt/archives/", "dir"), entry("var/cache/apt/archives/lock", data=b""),
         entry("var/lib/", "dir"), entry("var/lib/dpkg/", "dir"), entry("var/lib/dpkg/status", data=b"ok\n"),
         entry("usr/", "dir"), entry("usr/lib/", "dir"), entry("lib", "symlink", target="usr/lib"),
         entry("usr/share/", "dir"), entry("usr/share/doc/", "dir"), entry("opt/", "dir", mode=0o750, gid=10),
         entry("opt/app/", "dir"), entry("opt/app/data/", "dir"), entry("opt/app/data/old", data=b"old")]
    e.append(entry("usr/share/small/", "dir"))
    for i in range(n_small):
        e.append(entry("usr/share/small/f%05d" % i, data=b"%d\n" % i, mode=0o644 if i % 3 else 0o600,
                       uid=i % 7, gid=i % 5, mtime=MTIME + i))
    return e


def second_layer():
    return [entry("etc/", "dir"), entry("etc/.wh.motd"),                    # a file deleted
            entry("var/", "dir"), entry("var/cache/", "dir"), entry("var/cache/.wh.apt"),  # a directory deleted
            entry("opt/", "dir", mode=0o750, gid=10),
            entry("opt/app/", "dir", mode=0o711), entry("opt/app/.wh..wh..opq"),  # opaque: data/old hidden
            entry("opt/app/new", data=b"new app\n"),
            entry("etc/hostname", data=b"second\n", mode=0o600),           # a file replaced
            entry("bin/", "dir"), entry("bin/busybox", data=b"\x7fELF busybox v2" * 60, mode=0o755),
            entry("bin/ls", "hardlink", target="bin/busybox"),               # links of this layer
            entry("bin/cat", "hardlink", target="bin/busybox"),
            entry("home/", "dir"), entry("home/user/", "dir", mode=0o750, uid=1000, gid=1000),  # metadata change
            entry("srv/", "dir", mode=0o2775, gid=50, xattrs={"user.srv": b"1"}),
            entry("srv/www/", "dir"), entry("srv/www/index.html", data=b"<html>" * 100),
            entry("dev/", "dir"), entry("dev/.wh.zero"), entry("dev/random", "chr", dev=(1, 8), mode=0o644),
            entry("usr/", "dir"), entry("usr/share/", "dir"), entry("usr/share/doc/", "dir"),
            entry("usr/share/doc/README", data=b"readme\n")]


def third_layer():
    return [entry("etc/", "dir"), entry("etc/ssl/", "dir"), entry("etc/ssl/.wh..wh..opq"),
            entry("etc/ssl/openssl.cnf", data=b"[ req ]\n"),
            entry("var/", "dir"), entry("var/cache/", "dir"), entry("var/cache/apt/", "dir"),  # back after deletion
            entry("var/cache/apt/fresh", data=b"fresh"),
            entry("var/lib/", "dir"), entry("var/lib/.wh.dpkg"),
            entry("var/lib/dpkg", "symlink", target="../../usr/lib/dpkg"),  # a directory becomes a symlink
            entry("srv/", "dir", mode=0o2775, gid=50, xattrs={"user.srv": b"2"}),
            entry("srv/www/", "dir"), entry("srv/www/.wh.index.html"),
            entry("srv/www/index.html", "dir"),  # a file becomes a directory (whiteout first, as docker writes)
            entry("srv/www/index.html/x", data=b"x"),
            entry("tmp/", "dir", mode=0o1777), entry("tmp/.wh..wh..opq"),
            entry("run/", "dir"), entry("run/.wh.initctl"), entry("run/lock", "symlink", target="/run/lock"),
            entry("usr/", "dir"), entry("usr/share/", "dir"), entry("usr/share/small/", "dir"),
            entry("usr/share/small/.wh.f00001"), entry("usr/share/small/f00002", data=b"changed\n")]


FIXTURES = {
    # gzip base, zstd changes, plain tar changes
    "mixed": [(base_layer(50), "gzip"), (second_layer(), "zstd"), (third_layer(), "plain")],
    # the same content the other way round, and Docker's media type
    "reordered": [(base_layer(50), "plain"), (second_layer(), "docker-gzip"), (third_layer(), "zstd")],
    # many small files
    "many": [(base_layer(3000), "gzip"), (second_layer(), "gzip"), (third_layer(), "gzip")],
}


# ---- comparing trees ----

def describe(root):
    """path -> attributes, and the hard-link groups, of the tree under root."""
    files, inodes = {}, {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            p = os.path.join(dirpath, name)
            rel = os.path.relpath(p, root)
            st = os.lstat(p)
            fmt = stat.S_IFMT(st.st_mode)
            xattrs = {}
            if not stat.S_ISLNK(st.st_mode):
                for k in os.listxattr(p, follow_symlinks=False):
                    if not k.startswith("trusted.overlay."):
                        xattrs[k] = os.getxattr(p, k, follow_symlinks=False)
            d = {"type": fmt, "mode": oct(stat.S_IMODE(st.st_mode)), "uid": st.st_uid, "gid": st.st_gid,
                 "xattrs": xattrs}
            if stat.S_ISREG(fmt):
                with open(p, "rb") as f:
                    d["sha256"] = hashlib.sha256(f.read()).hexdigest()
                d["size"] = st.st_size
                inodes.setdefault((st.st_dev, st.st_ino), []).append(rel)
            if stat.S_ISLNK(fmt):
                d["target"] = os.readlink(p)
                del d["mode"]
            if stat.S_ISCHR(fmt) or stat.S_ISBLK(fmt):
                d["rdev"] = (os.major(st.st_rdev), os.minor(st.st_rdev))
            if not stat.S_ISDIR(fmt):
                d["mtime"] = st.st_mtime_ns
            files[rel] = d
    groups = sorted(sorted(g) for g in inodes.values() if len(g) > 1)
    return files, groups


def compare(oracle_root, ours_root):
    want, want_groups = describe(oracle_root)
    got, got_groups = describe(ours_root)
    problems = []
    for p in sorted(set(want) | set(got)):
        if p not in got:
            problems.append("missing: %s %s" % (p, want[p]))
        elif p not in want:
            problems.append("extra: %s %s" % (p, got[p]))
        elif want[p] != got[p]:
            problems.append("differs: %s\n  umoci:   %s\n  crimage: %s" % (p, want[p], got[p]))
    if want_groups != got_groups:
        problems.append("hard links: umoci %s, crimage %s" % (want_groups, got_groups))
    return problems


def spot_check(root):
    """A few facts of every fixture, so an empty or unmerged tree cannot pass the comparison."""
    def st(rel):
        return os.lstat(os.path.join(root, rel))
    assert not os.path.lexists(os.path.join(root, "etc/motd"))  # whiteout
    assert not os.path.lexists(os.path.join(root, "var/cache/apt/pkgcache.bin"))  # whiteout of the directory
    assert os.path.exists(os.path.join(root, "var/cache/apt/fresh"))
    assert not os.path.lexists(os.path.join(root, "opt/app/data"))  # opaque
    assert os.listdir(os.path.join(root, "tmp")) == []  # opaque, empty
    assert stat.S_IMODE(st("bin/su").st_mode) == 0o4755
    assert os.getxattr(os.path.join(root, "bin/ping"), "security.capability") == CAP_NET_RAW
    assert stat.S_ISDIR(st("srv/www/index.html").st_mode)
    assert os.readlink(os.path.join(root, "var/lib/dpkg")) == "../../usr/lib/dpkg"
    assert st("bin/busybox").st_ino == st("bin/cat").st_ino
    assert (st("home/user").st_uid, stat.S_IMODE(st("home/user").st_mode)) == (1000, 0o750)
    assert len(os.listdir(os.path.join(root, "usr/share/small"))) >= 49


def is_whiteout(st):
    return stat.S_ISCHR(st.st_mode) and st.st_rdev == 0


def merge_layers(layer_dirs, out):
    """overlayfs' view of the layers (lowest first), for machines where an overlay mount is not possible: upper
    entries hide lower ones, directories merge unless opaque, whiteouts hide and are not shown."""
    def merge(rel):
        names = {}
        for d in reversed(layer_dirs):  # topmost first
            p = os.path.join(d, rel)
            if not os.path.lexists(p):
                continue
            if os.path.islink(p) or not os.path.isdir(p):
                break  # a non-directory (or whiteout) hides everything below
            for n in os.listdir(p):
                names.setdefault(n, d)
            if "trusted.overlay.opaque" in os.listxattr(p, follow_symlinks=False):
                break
        for n, d in sorted(names.items()):
            src = os.path.join(d, rel, n)
            st = os.lstat(src)
            if is_whiteout(st):
                continue
            dst = os.path.join(out, rel, n)
            if stat.S_ISDIR(st.st_mode):
                os.mkdir(dst)
                merge(os.path.join(rel, n))
                shutil.copystat(src, dst, follow_symlinks=False)
                os.chown(dst, st.st_uid, st.st_gid)
                os.chmod(dst, stat.S_IMODE(st.st_mode))
                for k in os.listxattr(src):
                    if not k.startswith("trusted.overlay."):
                        os.setxattr(dst, k, os.getxattr(src, k))
            else:
                # hard links keep their inode: the comparison looks at link groups
                os.link(src, dst, follow_symlinks=False)
    merge("")


def overlay_mount(layer_dirs, mnt):
    lower = ":".join(reversed(layer_dirs))
    r = subprocess.run(["mount", "-t", "overlay", "overlay", "-o", "ro,lowerdir=" + lower, mnt],
                       capture_output=True, text=True)
    return r.returncode == 0, r.stderr


@pytest.mark.parametrize("name", sorted(FIXTURES))
def test_unpack_matches_umoci(name, tmp_path):
    tool = os.path.join(build_dir(), "tests", "unit", "unpack-tool")
    assert os.access(tool, os.X_OK), "build the project first: " + tool
    layout = str(tmp_path / "layout")
    layers = write_layout(layout, "test", FIXTURES[name], str(tmp_path))
    umoci_layout = str(tmp_path / "layout-umoci")
    write_layout(umoci_layout, "test", FIXTURES[name], str(tmp_path), no_zstd=True)

    bundle = str(tmp_path / "bundle")
    r = subprocess.run(["umoci", "unpack", "--image", umoci_layout + ":test", bundle], capture_output=True,
                       text=True)
    assert r.returncode == 0, "umoci unpack: " + r.stderr

    store = tmp_path / "layers"
    store.mkdir()
    dirs = []
    for i, (mt, blob, diff_id) in enumerate(layers):
        d = str(store / ("%d" % i))
        r = subprocess.run([tool, mt, blob, d], capture_output=True, text=True)
        assert r.returncode == 0, "unpack-tool %s: %s" % (mt, r.stderr)
        assert r.stdout.strip() == diff_id
        dirs.append(d)
    # nothing but the layer directories is left in the store
    assert sorted(os.listdir(store)) == [str(i) for i in range(len(layers))]

    mnt = str(tmp_path / "mnt")
    os.mkdir(mnt)
    mounted, why = overlay_mount(dirs, mnt)
    try:
        if not mounted:
            merged = str(tmp_path / "merged")
            os.mkdir(merged)
            merge_layers(dirs, merged)
            root = merged
        else:
            root = mnt
        problems = compare(os.path.join(bundle, "rootfs"), root)
        spot_check(root)
    finally:
        if mounted:
            subprocess.run(["umount", mnt], check=True)
    assert not problems, "\n".join(problems[:40])


def test_merge_emulation_matches_overlay(tmp_path):
    """The fallback merge follows overlayfs: on a machine where both work they agree."""
    tool = os.path.join(build_dir(), "tests", "unit", "unpack-tool")
    layout = str(tmp_path / "layout")
    layers = write_layout(layout, "test", FIXTURES["mixed"], str(tmp_path))
    dirs = []
    for i, (mt, blob, _) in enumerate(layers):
        d = str(tmp_path / ("l%d" % i))
        subprocess.run([tool, mt, blob, d], check=True, capture_output=True)
        dirs.append(d)
    mnt = str(tmp_path / "mnt")
    os.mkdir(mnt)
    mounted, why = overlay_mount(dirs, mnt)
    if not mounted:
        pytest.skip("overlay mounts are not possible here: " + why)
    try:
        merged = str(tmp_path / "merged")
        os.mkdir(merged)
        merge_layers(dirs, merged)
        problems = compare(mnt, merged)
    finally:
        subprocess.run(["umount", mnt], check=True)
    assert not problems, "\n".join(problems[:40])
