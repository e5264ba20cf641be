"""`crimage rootfs IMAGE DIR` (a flattened copy of an unpacked image) and `crimage mount IMAGE DIR` / `crimage umount
DIR` (a read-only overlay of its layers) against crimaged with unpackLayers.

The copy is compared file by file (names, types, modes, owners, sizes, contents, link targets, device numbers,
xattrs, mtimes, hard-link groups) with `umoci raw unpack` of the same image and with the overlay mount of its layers
(which also has directory mtimes and the root's attributes); the image's command runs in `chroot` of both. Beyond
the runnable images, the umoci fixtures of test_unpack_oracle (hard links, devices, fifos, setuid, owners, xattrs,
a directory becoming a symlink, a file becoming a directory) are pushed and pulled, and images whose lower layers
leave symlinks pointing out of the tree check that the copy never writes through them. Needs root and umoci."""

import json
import os
import shutil
import stat
import subprocess

import pytest

import fixtures
import test_unpack_oracle as oracle
from conftest import build_dir

pytestmark = [
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root (owners, devices, overlay mounts)"),
    pytest.mark.skipif(not shutil.which("umoci"), reason="umoci is not installed"),
]

UNPACK = {"unpackLayers": True}


def crimage(d, *args, timeout=120):
    exe = os.path.join(build_dir(), "plugin", "crimage")
    return subprocess.run([exe, "--socket", d.socket, *args], capture_output=True, text=True, timeout=timeout,
                          stdin=subprocess.DEVNULL)


def ok(d, *args):
    r = crimage(d, *args)
    assert r.returncode == 0, r.stderr
    return r


def umount_quietly(mnt):
    subprocess.run(["umount", mnt], capture_output=True, timeout=30)


def describe_all(root):
    """oracle.describe, plus what a copy must also get right and umoci is not asked for: directory mtimes and the
    attributes of the root itself."""
    files, groups = oracle.describe(root)
    for rel, d in files.items():
        if d["type"] == stat.S_IFDIR:
            d["mtime"] = os.lstat(os.path.join(root, rel)).st_mtime_ns
    st = os.lstat(root)
    files["."] = {"mode": oct(stat.S_IMODE(st.st_mode)), "uid": st.st_uid, "gid": st.st_gid,
                  "mtime": st.st_mtime_ns}
    return files, groups


def differences(want_root, got_root, full=False):
    """Problems of got_root against want_root; full: with directory mtimes and the root's attributes."""
    describe = describe_all if full else oracle.describe
    want, want_groups = describe(want_root)
    got, got_groups = describe(got_root)
    problems = []
    for p in sorted(set(want) | set(got)):
        if p not in got:
            problems.append(f"missing: {p} {want[p]}")
        elif p not in want:
            problems.append(f"extra: {p} {got[p]}")
        elif want[p] != got[p]:
            problems.append(f"differs: {p}\n  want: {want[p]}\n  got:  {got[p]}")
    if want_groups != got_groups:
        problems.append(f"hard links: want {want_groups}, got {got_groups}")
    return problems


def umoci_rootfs(layout, tag, out):
    r = subprocess.run(["umoci", "raw", "unpack", "--image", f"{layout}:{tag}", out], capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 0, "umoci raw unpack: " + r.stderr
    return out


def layer_dirs(d, image):
    return [os.path.join(d.root, "layers", "sha256", layer.diff_id.split(":", 1)[1]) for layer in image.layers]


def push_layout(layout, tag, repo, registry, tmp_path):
    work = str(tmp_path / ("push-" + repo.replace("/", "-")))
    os.makedirs(work)
    ref = f"{registry.host}/crimage-test/{repo}:1"
    fixtures.skopeo_push(layout, tag, ref, fixtures._policy(work), tmpdir=work)
    return ref


@pytest.mark.parametrize("key", ["whiteout", "hello", "multi-hello"])
def test_rootfs_is_umocis_and_the_overlays(key, daemon_factory, runnable_images, tmp_path):
    """The copy equals umoci's unpack of the same image and the overlay mount of its layers, and the image's
    command runs in it."""
    pushed = runnable_images[key]
    d = daemon_factory(config=UNPACK)
    ok(d, "pull", "--quiet", pushed.ref())
    img = pushed.single()

    out = str(tmp_path / "rootfs")  # absent: created
    r = ok(d, "rootfs", pushed.ref(), out)
    n = len(img.layers)
    assert r.stdout == f"Copied {img.id} ({n} layer{'' if n == 1 else 's'}) to {out}\n"

    layout = str(tmp_path / "layout")
    fixtures.write_oci_layout(layout, img, "fixture")
    want = umoci_rootfs(layout, "fixture", str(tmp_path / "umoci"))
    problems = differences(want, out)
    assert not problems, "\n".join(problems[:40])

    mnt = str(tmp_path / "mnt")
    os.mkdir(mnt)
    ok(d, "mount", pushed.ref(), mnt)
    try:
        problems = differences(mnt, out, full=True)
    finally:
        ok(d, "umount", mnt)
    assert not problems, "\n".join(problems[:40])

    run = subprocess.run(["chroot", out] + img.config["config"]["Cmd"], capture_output=True, text=True, timeout=60)
    assert run.returncode == 0 and run.stdout == pushed.output + "\n", run


def test_mount_runs_the_command_read_only(daemon_factory, runnable_images, tmp_path):
    """Three layers are an overlay, one layer a bind mount; both read-only, the command runs in chroot of the
    mount point, a second mount on it is refused, and umount undoes it."""
    d = daemon_factory(config=UNPACK)
    for key, fstype in (("whiteout", "overlay"), ("hello", None)):
        pushed = runnable_images[key]
        ok(d, "pull", "--quiet", pushed.ref())
        mnt = str(tmp_path / f"mnt-{key}")
        os.mkdir(mnt)
        r = ok(d, "mount", pushed.ref(), mnt)
        assert r.stdout.startswith(f"Mounted {pushed.single().id} ") and r.stdout.endswith(f" on {mnt}, read-only\n")
        try:
            found = subprocess.run(["findmnt", "-n", "-o", "FSTYPE,OPTIONS", mnt], capture_output=True, text=True)
            fs, opts = found.stdout.split()
            assert "ro" in opts.split(",")
            if fstype:
                assert fs == fstype
                lower = layer_dirs(d, pushed.single())
                assert "lowerdir=" + ":".join(reversed(lower)) in opts
            run = subprocess.run(["chroot", mnt] + pushed.single().config["config"]["Cmd"], capture_output=True,
                                 text=True, timeout=60)
            assert run.returncode == 0 and run.stdout == pushed.output + "\n", run
            with pytest.raises(OSError) as e:
                open(os.path.join(mnt, "new-file"), "w")
            assert e.value.errno == 30  # EROFS

            again = crimage(d, "mount", pushed.ref(), mnt)
            assert again.returncode == 1
            assert "is a mount point already" in again.stderr, again.stderr
        finally:
            r = crimage(d, "umount", mnt)
            if r.returncode != 0:
                umount_quietly(mnt)
        assert r.returncode == 0 and r.stdout == f"Unmounted {mnt}\n", r.stderr
        assert os.listdir(mnt) == []
        again = crimage(d, "umount", mnt)
        assert again.returncode == 1 and "is not a mount point" in again.stderr, again.stderr


def test_rich_layers_against_umoci(daemon_factory, registry, tmp_path):
    """The oracle's mixed fixture (whiteouts of files and directories, opaque directories, hard links within a
    layer, devices, a fifo, setuid and setgid, owners, security.capability and user xattrs, a directory that
    becomes a symlink and a file that becomes a directory) pushed, pulled and copied: equal to umoci's unpack and
    to the overlay; the copy shares nothing with the store."""
    layout = str(tmp_path / "layout")
    oracle.write_layout(layout, "test", oracle.FIXTURES["mixed"], str(tmp_path), no_zstd=True)
    ref = push_layout(layout, "test", "rootfs-rich", registry, tmp_path)
    d = daemon_factory(config=UNPACK)
    ok(d, "pull", "--quiet", ref)

    out = str(tmp_path / "rootfs")
    os.mkdir(out)  # present and empty
    ok(d, "rootfs", ref, out)
    want = umoci_rootfs(layout, "test", str(tmp_path / "umoci"))
    problems = differences(want, out)
    assert not problems, "\n".join(problems[:40])
    oracle.spot_check(out)

    mnt = str(tmp_path / "mnt")
    os.mkdir(mnt)
    ok(d, "mount", ref, mnt)
    try:
        problems = differences(mnt, out, full=True)
    finally:
        ok(d, "umount", mnt)
    assert not problems, "\n".join(problems[:40])

    # copies, not links: a change in the copy does not reach the store
    info = json.loads(ok(d, "--output", "json", "inspect", ref).stdout)
    top = info["info"]["unpackedLayers"][1]
    before = open(os.path.join(top, "bin", "busybox"), "rb").read()
    assert os.stat(os.path.join(out, "bin", "busybox")).st_ino != os.stat(os.path.join(top, "bin", "busybox")).st_ino
    with open(os.path.join(out, "bin", "busybox"), "ab") as f:
        f.write(b"changed in the copy")
    assert open(os.path.join(top, "bin", "busybox"), "rb").read() == before
    assert open(os.path.join(out, "bin", "cat"), "rb").read().endswith(b"changed in the copy")  # its hard link


def test_lower_symlinks_are_not_followed(daemon_factory, registry, tmp_path):
    """Lower layers leave symlinks to a directory outside (absolute, relative, and one replacing a directory);
    upper layers put directories and files at those names. The copy replaces the symlinks as overlayfs shows it;
    nothing is written outside."""
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "keep").write_text("untouched\n")
    rel = os.path.relpath(str(outside), "/")
    bottom = fixtures.Layer([("etc", ("symlink", str(outside))), ("up", ("symlink", "../../../../../../../" + rel)),
                             ("dir", None), ("dir/old", b"old\n")])
    middle = fixtures.Layer([("dir", ("symlink", str(outside))), ("var", ("symlink", str(outside)))])
    top = fixtures.Layer([("etc", None), ("etc/passwd", b"root:x:0:0::/:/bin/sh\n"), ("up", None),
                          ("up/keep", b"from the image\n"), ("dir", None), ("dir/new", b"new\n"),
                          ("var", None), ("var/lib", None), ("var/lib/x", b"x\n")])
    image = fixtures.Image("rootfs-escape", [bottom, middle, top])
    layout = str(tmp_path / "layout")
    fixtures.write_oci_layout(layout, image, "fixture")
    ref = push_layout(layout, "fixture", "rootfs-escape", registry, tmp_path)
    d = daemon_factory(config=UNPACK)
    ok(d, "pull", "--quiet", ref)

    out = str(tmp_path / "rootfs")
    ok(d, "rootfs", ref, out)
    assert sorted(os.listdir(outside)) == ["keep"]
    assert (outside / "keep").read_text() == "untouched\n"
    for name in ("etc", "up", "dir", "var"):
        assert stat.S_ISDIR(os.lstat(os.path.join(out, name)).st_mode), name
    assert open(os.path.join(out, "etc", "passwd")).read().startswith("root:")
    assert open(os.path.join(out, "up", "keep")).read() == "from the image\n"
    assert sorted(os.listdir(os.path.join(out, "dir"))) == ["new"]  # the symlink hid dir/old, the new dir too
    assert os.listdir(os.path.join(out, "var", "lib")) == ["x"]

    mnt = str(tmp_path / "mnt")
    os.mkdir(mnt)
    ok(d, "mount", ref, mnt)
    try:
        problems = differences(mnt, out, full=True)
    finally:
        ok(d, "umount", mnt)
    assert not problems, "\n".join(problems[:40])


def test_errors(daemon_factory, runnable_images, tmp_path):
    """An image that is not unpacked, a directory that is not empty, an unknown image, a missing mount point, wrong
    usage, another runtime handler, and not being root."""
    pushed = runnable_images["whiteout"]
    d = daemon_factory(config={"runtimeHandlers": {"unpacked": {"unpackLayers": True}}})
    ok(d, "pull", "--quiet", pushed.ref())
    out = str(tmp_path / "rootfs")

    for verb in ("rootfs", "mount"):
        r = crimage(d, verb, pushed.ref(), out)
        assert r.returncode == 1, r
        assert f"crimage: {verb} {pushed.ref()}: FAILED_PRECONDITION: {pushed.ref()} is not unpacked: set " \
               "unpackLayers (or runtimeHandlers.<h>.unpackLayers)" in r.stderr, r.stderr
        assert "pull it again" in r.stderr
    assert not os.path.exists(out)

    # pulled for the handler that unpacks: there it works, and only there
    r = crimage(d, "rootfs", "--runtime-handler", "unpacked", pushed.ref(), out)
    assert r.returncode == 1 and "NOT_FOUND: no such image" in r.stderr, r.stderr
    ok(d, "pull", "--quiet", "--runtime-handler", "unpacked", pushed.ref())
    ok(d, "rootfs", "--runtime-handler", "unpacked", pushed.ref(), out)
    assert os.path.isfile(os.path.join(out, "etc", "marker"))

    full = tmp_path / "full"
    full.mkdir()
    (full / "mine").write_text("mine\n")
    r = crimage(d, "rootfs", "--runtime-handler", "unpacked", pushed.ref(), str(full))
    assert r.returncode == 1 and f"{full} is not empty" in r.stderr, r.stderr
    assert os.listdir(full) == ["mine"]

    r = crimage(d, "rootfs", "127.0.0.1:1/nope:v1", str(tmp_path / "nope"))
    assert r.returncode == 1 and "NOT_FOUND" in r.stderr, r.stderr
    r = crimage(d, "mount", "--runtime-handler", "unpacked", pushed.ref(), str(tmp_path / "missing"))
    assert r.returncode == 1 and "NOT_FOUND" in r.stderr and "missing" in r.stderr, r.stderr

    for args in (["rootfs"], ["rootfs", pushed.ref()], ["mount", "a", "b", "c"], ["umount"], ["rootfs", "--bogus"]):
        r = crimage(d, *args)
        assert r.returncode == 2, (args, r)

    if shutil.which("setpriv"):
        r = subprocess.run(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups",
                            os.path.join(build_dir(), "plugin", "crimage"), "--socket", d.socket, "rootfs",
                            pushed.ref(), "/tmp/crimage-never"], capture_output=True, text=True, timeout=60)
        assert r.returncode == 1 and "PERMISSION_DENIED: needs root" in r.stderr, r.stderr
        assert not os.path.exists("/tmp/crimage-never")


def test_mount_long_chain_and_reserved_characters(daemon_factory, registry, tmp_path):
    """40 layers make a lowerdir longer than the page mount(2) takes, and a store whose path has ',' and ':' (which
    the options syntax reserves) cannot be named in it: both still mount, and equal the copy."""
    layers = [fixtures.Layer([("bin", None), ("bin/busybox", open(fixtures.BUSYBOX, "rb").read(), 0o755)])]
    layers += [fixtures.Layer([("files", None), (f"files/f{i:02d}", b"%d\n" % i)]) for i in range(1, 40)]
    layers.append(fixtures.Layer([("files", None), ("files/.wh.f01", b"")]))
    image = fixtures.Image("rootfs-long", layers, cmd=[fixtures.BUSYBOX, "ls", "/files"])
    layout = str(tmp_path / "layout")
    fixtures.write_oci_layout(layout, image, "fixture")
    ref = push_layout(layout, "fixture", "rootfs-long", registry, tmp_path)
    for root in (None, str(tmp_path / "store,with:odd")):
        d = daemon_factory(config=dict(UNPACK, root=root) if root else UNPACK)
        ok(d, "pull", "--quiet", ref)
        dirs = layer_dirs(d, image)
        assert len("lowerdir=" + ":".join(dirs)) > os.sysconf("SC_PAGESIZE") or root
        out = str(tmp_path / f"rootfs-{len(os.listdir(tmp_path))}")
        ok(d, "rootfs", ref, out)
        assert sorted(os.listdir(os.path.join(out, "files"))) == [f"f{i:02d}" for i in range(2, 40)]
        mnt = str(tmp_path / f"mnt-{len(os.listdir(tmp_path))}")
        os.mkdir(mnt)
        ok(d, "mount", ref, mnt)
        try:
            problems = differences(mnt, out, full=True)
            run = subprocess.run(["chroot", mnt] + image.config["config"]["Cmd"], capture_output=True, text=True,
                                 timeout=60)
        finally:
            ok(d, "umount", mnt)
        assert not problems, "\n".join(problems[:40])
        assert run.returncode == 0 and run.stdout.split() == [f"f{i:02d}" for i in range(2, 40)], run
