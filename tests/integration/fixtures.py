"""Test images for the integration tests, generated in Python as OCI image layouts and pushed with skopeo.

Everything here is deterministic (fixed timestamps, owners, gzip headers and a seeded random generator), so the
digests of layers, configs, manifests and indexes are the same on every run and can be computed before the push and
checked against what the registry and the daemon report.
"""

import base64
import gzip
import hashlib
import io
import json
import os
import platform
import random
import subprocess
import tarfile
import urllib.request

MT_OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
MT_OCI_INDEX = "application/vnd.oci.image.index.v1+json"
MT_OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
MT_OCI_LAYER_GZIP = "application/vnd.oci.image.layer.v1.tar+gzip"
MT_DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
MT_DOCKER_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
ACCEPT_ALL = ", ".join([MT_OCI_MANIFEST, MT_OCI_INDEX, MT_DOCKER_MANIFEST, MT_DOCKER_LIST])

EPOCH = 1700000000  # 2023-11-14T22:13:20Z
CREATED = "2023-11-14T22:13:20Z"

_GOARCH = {"x86_64": "amd64", "amd64": "amd64", "aarch64": "arm64", "arm64": "arm64", "armv7l": "arm",
           "ppc64le": "ppc64le", "s390x": "s390x", "riscv64": "riscv64", "i686": "386"}


def host_arch():
    """The architecture of this machine in OCI (GOARCH) spelling."""
    m = platform.machine()
    return _GOARCH.get(m, m)


def sha256(data):
    return "sha256:" + hashlib.sha256(data).hexdigest()


def canonical_json(obj):
    return json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()


def chain_id(diff_ids):
    """The OCI ChainID of a layer stack: ChainID(L0) = DiffID(L0), ChainID(Ln) = sha256(ChainID(Ln-1) + " " + DiffID(Ln))."""
    chain = None
    for d in diff_ids:
        chain = d if chain is None else sha256(f"{chain} {d}".encode())
    return chain


class Layer:
    """A gzip-compressed tar layer built from a list of entries.

    An entry is (path, bytes) for a regular file (mode 0644), (path, bytes, mode) for one with another mode (0o755
    for an executable), (path, None) for a directory, or (path, ("symlink", target)).
    """

    def __init__(self, entries):
        tar_buf = io.BytesIO()
        with tarfile.open(fileobj=tar_buf, mode="w", format=tarfile.USTAR_FORMAT) as tar:
            for path, content, *mode in entries:
                info = tarfile.TarInfo(path)
                info.mtime = EPOCH
                info.uid = info.gid = 0
                info.uname = info.gname = "root"
                if content is None:
                    info.type = tarfile.DIRTYPE
                    info.mode = 0o755
                    tar.addfile(info)
                elif isinstance(content, tuple) and content[0] == "symlink":
                    info.type = tarfile.SYMTYPE
                    info.linkname = content[1]
                    info.mode = 0o777
                    tar.addfile(info)
                else:
                    info.mode = mode[0] if mode else 0o644
                    info.size = len(content)
                    tar.addfile(info, io.BytesIO(content))
        self.tar = tar_buf.getvalue()
        gz_buf = io.BytesIO()
        # filename="" and mtime=0 keep the gzip header free of anything that varies between runs.
        with gzip.GzipFile(filename="", fileobj=gz_buf, mode="wb", mtime=0, compresslevel=6) as gz:
            gz.write(self.tar)
        self.data = gz_buf.getvalue()
        self.digest = sha256(self.data)
        self.diff_id = sha256(self.tar)
        self.size = len(self.data)

    def descriptor(self):
        return {"mediaType": MT_OCI_LAYER_GZIP, "digest": self.digest, "size": self.size}


class Image:
    """A single-platform image: layers, config and an OCI manifest."""

    def __init__(self, name, layers, arch=None, os_="linux", user="", variant=None, extra_env=(), cmd=("/bin/sh",)):
        self.name = name
        self.layers = list(layers)
        self.arch = arch or host_arch()
        self.os = os_
        self.variant = variant
        self.user = user
        self.config = {
            "created": CREATED,
            "architecture": self.arch,
            "os": self.os,
            "config": {
                "User": user,
                "Env": ["PATH=/usr/local/bin:/usr/bin:/bin", f"FIXTURE={name}"] + list(extra_env),
                "Cmd": list(cmd),
                "WorkingDir": "/",
                "Labels": {"org.example.fixture": name},
            },
            "rootfs": {"type": "layers", "diff_ids": [layer.diff_id for layer in self.layers]},
            "history": [{"created": CREATED, "created_by": f"fixture {name} layer {i}"}
                        for i in range(len(self.layers))],
        }
        if variant:
            self.config["variant"] = variant
        self.config_bytes = canonical_json(self.config)
        self.config_digest = sha256(self.config_bytes)
        self.manifest = {
            "schemaVersion": 2,
            "mediaType": MT_OCI_MANIFEST,
            "config": {"mediaType": MT_OCI_CONFIG, "digest": self.config_digest, "size": len(self.config_bytes)},
            "layers": [layer.descriptor() for layer in self.layers],
        }
        self.manifest_bytes = canonical_json(self.manifest)
        self.manifest_digest = sha256(self.manifest_bytes)

    @property
    def id(self):
        """The image ID the CRI reports: the config digest."""
        return self.config_digest

    @property
    def chain_id(self):
        return chain_id([layer.diff_id for layer in self.layers])

    @property
    def platform(self):
        p = f"{self.os}/{self.arch}"
        return p + "/" + self.variant if self.variant else p

    def compressed_size(self):
        return sum(layer.size for layer in self.layers)

    def uncompressed_size(self):
        return sum(len(layer.tar) for layer in self.layers)

    def blobs(self):
        out = {self.config_digest: self.config_bytes, self.manifest_digest: self.manifest_bytes}
        for layer in self.layers:
            out[layer.digest] = layer.data
        return out

    def top_descriptor(self):
        return {"mediaType": MT_OCI_MANIFEST, "digest": self.manifest_digest, "size": len(self.manifest_bytes)}


class Index:
    """A multi-platform image: an OCI image index over several single-platform images."""

    def __init__(self, name, images):
        self.name = name
        self.images = list(images)
        manifests = []
        for img in self.images:
            plat = {"architecture": img.arch, "os": img.os}
            if img.variant:
                plat["variant"] = img.variant
            d = img.top_descriptor()
            d["platform"] = plat
            manifests.append(d)
        self.index = {"schemaVersion": 2, "mediaType": MT_OCI_INDEX, "manifests": manifests}
        self.index_bytes = canonical_json(self.index)
        self.manifest_digest = sha256(self.index_bytes)

    def for_platform(self, plat):
        for img in self.images:
            if img.platform == plat:
                return img
        raise KeyError(plat)

    def blobs(self):
        out = {self.manifest_digest: self.index_bytes}
        for img in self.images:
            out.update(img.blobs())
        return out

    def top_descriptor(self):
        return {"mediaType": MT_OCI_INDEX, "digest": self.manifest_digest, "size": len(self.index_bytes)}


def write_oci_layout(path, image, ref_name):
    """Writes `image` (an Image or an Index) as an OCI image layout at `path`, tagged `ref_name`."""
    blob_dir = os.path.join(path, "blobs", "sha256")
    os.makedirs(blob_dir, exist_ok=True)
    for digest, data in image.blobs().items():
        with open(os.path.join(blob_dir, digest.split(":", 1)[1]), "wb") as f:
            f.write(data)
    with open(os.path.join(path, "oci-layout"), "wb") as f:
        f.write(canonical_json({"imageLayoutVersion": "1.0.0"}))
    desc = image.top_descriptor()
    desc["annotations"] = {"org.opencontainers.image.ref.name": ref_name}
    with open(os.path.join(path, "index.json"), "wb") as f:
        f.write(canonical_json({"schemaVersion": 2, "manifests": [desc]}))


def _files(prefix, n, size, seed):
    rnd = random.Random(seed)
    return [(f"{prefix}/file{i}.txt", rnd.randbytes(size)) for i in range(n)]


def build_catalog():
    """All fixture images, by a short key. Names are repository paths in the test registry."""
    base = Layer([("etc", None), ("etc/os-release", b"ID=fixture\nVERSION_ID=1\n"),
                  ("bin", None), ("bin/sh", b"#!fixture shell\n"), ("usr", None), ("usr/bin", None),
                  ("usr/bin/env", ("symlink", "/bin/sh"))])
    mid = Layer([("opt", None), ("opt/app", None)] + _files("opt/app", 4, 1024, 1))
    top = Layer([("etc", None), ("etc/motd", b"layers fixture\n"), ("opt", None), ("opt/app", None),
                 ("opt/app/.wh.file0.txt", b"")])
    extra = Layer([("srv", None)] + _files("srv", 3, 2048, 2))
    passwd = Layer([("etc", None), ("etc/passwd", b"root:x:0:0:root:/root:/bin/sh\n"
                                                  b"www-data:x:33:33:www-data:/var/www:/bin/sh\n"),
                    ("etc/group", b"root:x:0:\nwww-data:x:33:\n")])

    cat = {}
    cat["layers"] = Image("layers", [base, mid, top])
    cat["shared"] = Image("shared", [base, extra])

    arch_images = []
    for arch, seed in (("amd64", 10), ("arm64", 11)):
        arch_base = Layer([("etc", None), ("etc/arch", arch.encode() + b"\n")])
        arch_bin = Layer([("usr", None), ("usr/bin", None)] + _files("usr/bin", 2, 4096, seed))
        arch_images.append(Image("multi", [arch_base, arch_bin], arch=arch, extra_env=[f"ARCH={arch}"]))
    cat["multi"] = Index("multi", arch_images)

    cat["user1002"] = Image("user1002", [base, passwd], user="1002")
    cat["userwww"] = Image("userwww", [base, passwd], user="www-data")
    cat["user1003"] = Image("user1003", [base, passwd], user="1003:1004")

    big_data = random.Random(42).randbytes(4 << 20)
    cat["big"] = Image("big", [base, Layer([("data", None), ("data/blob.bin", big_data)])])

    cat["dockerfmt"] = Image("dockerfmt", [Layer([("docker", None), ("docker/format", b"v2s2\n")])])
    return cat


class PushedImage:
    """An image as it is in the test registry."""

    def __init__(self, image, registry_host, repo, tags, manifest_digest):
        self.image = image
        self.registry_host = registry_host
        self.repo = repo
        self.tags = list(tags)
        self.manifest_digest = manifest_digest  # digest of what the registry serves (index or manifest)

    @property
    def name(self):
        return f"{self.registry_host}/{self.repo}"

    def ref(self, tag=None):
        return f"{self.name}:{tag or self.tags[0]}"

    def digest_ref(self):
        return f"{self.name}@{self.manifest_digest}"

    def id_for(self, plat=None):
        """Expected image ID; for an index the config digest of the entry for `plat` (default: this host)."""
        if isinstance(self.image, Index):
            return self.image.for_platform(plat or f"linux/{host_arch()}").config_digest
        return self.image.config_digest

    def single(self, plat=None):
        if isinstance(self.image, Index):
            return self.image.for_platform(plat or f"linux/{host_arch()}")
        return self.image


def registry_manifest_digest(host, repo, ref):
    req = urllib.request.Request(f"http://{host}/v2/{repo}/manifests/{ref}", method="HEAD",
                                 headers={"Accept": ACCEPT_ALL})
    with urllib.request.urlopen(req, timeout=30) as resp:
        return resp.headers["Docker-Content-Digest"]


def registry_get(host, path, accept=ACCEPT_ALL):
    req = urllib.request.Request(f"http://{host}{path}", headers={"Accept": accept})
    with urllib.request.urlopen(req, timeout=30) as resp:
        return resp.read()


def skopeo_push(layout_dir, ref_name, dest, policy_path, fmt=None, tmpdir=None, creds=None):
    cmd = ["skopeo", "--policy", policy_path]
    if tmpdir:
        cmd += ["--tmpdir", tmpdir]
    cmd += ["copy", "--all", "--quiet", "--dest-tls-verify=false"]
    if creds:
        cmd += ["--dest-creds", creds]
    if fmt:
        cmd += ["--format", fmt]
    else:
        cmd += ["--preserve-digests"]
    cmd += [f"oci:{layout_dir}:{ref_name}", f"docker://{dest}"]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    if r.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({r.returncode}): {r.stderr}")


# What gets pushed: key in the catalog -> (repository, tags, manifest format or None for unchanged OCI).
PUSH_PLAN = [
    ("layers", "layers", ["v1", "latest"], None),
    ("layers", "team/app", ["v1"], None),
    ("shared", "shared", ["v1"], None),
    ("multi", "multi", ["v1", "latest"], None),
    ("user1002", "user1002", ["v1"], None),
    ("userwww", "userwww", ["v1"], None),
    ("user1003", "user1003", ["v1"], None),
    ("big", "big", ["v1"], None),
    ("dockerfmt", "dockerfmt", ["v1"], "v2s2"),
    ("multi", "multilist", ["v1"], "v2s2"),
]


def _policy(workdir):
    policy = os.path.join(workdir, "policy.json")
    with open(policy, "w") as f:
        json.dump({"default": [{"type": "insecureAcceptAnything"}]}, f)
    return policy


def push_one(workdir, registry_host, key, repo, tag, creds):
    """Pushes one catalog image unchanged to a registry that needs `creds` ("user:password")."""
    image = build_catalog()[key]
    layout = os.path.join(workdir, "layouts", key)
    if not os.path.exists(os.path.join(layout, "index.json")):
        write_oci_layout(layout, image, "fixture")
    tmp = os.path.join(workdir, "skopeo-tmp")
    os.makedirs(tmp, exist_ok=True)
    skopeo_push(layout, "fixture", f"{registry_host}/{repo}:{tag}", _policy(workdir), tmpdir=tmp, creds=creds)
    return PushedImage(image, registry_host, repo, [tag], image.manifest_digest)


def push_all(workdir, registry_host):
    """Generates every fixture image, pushes it to `registry_host` and returns {repo: PushedImage}.

    Each pushed manifest digest is read back from the registry; for images pushed unchanged it must equal the one
    computed here, which proves the fixture generation and the push agree before any test relies on them.
    """
    cat = build_catalog()
    policy = _policy(workdir)
    tmp = os.path.join(workdir, "skopeo-tmp")
    os.makedirs(tmp, exist_ok=True)
    pushed = {}
    for key, repo, tags, fmt in PUSH_PLAN:
        image = cat[key]
        layout = os.path.join(workdir, "layouts", key)
        if not os.path.exists(os.path.join(layout, "index.json")):
            write_oci_layout(layout, image, "fixture")
        for tag in tags:
            skopeo_push(layout, "fixture", f"{registry_host}/{repo}:{tag}", policy, fmt=fmt, tmpdir=tmp)
        digest = registry_manifest_digest(registry_host, repo, tags[0])
        if fmt is None and digest != image.manifest_digest:
            raise RuntimeError(f"{repo}: registry serves {digest}, generated {image.manifest_digest}")
        for tag in tags[1:]:
            other = registry_manifest_digest(registry_host, repo, tag)
            if other != digest:
                raise RuntimeError(f"{repo}:{tag} serves {other}, expected {digest}")
        pushed[repo] = PushedImage(image, registry_host, repo, tags, digest)
    return pushed


# ---------------------------------------------------------------------------------------------------------------
# Runnable images: a container runtime can start these. Their one binary is Debian's busybox-static, so the images
# are deterministic for a given installed busybox; every command prints one known line and exits 0, or says what
# is wrong and exits 1.

BUSYBOX = "/bin/busybox"


def hello_line(name):
    """The line the runnable image `name` prints on success."""
    return f"crimage-hello-{name}"


def other_arch():
    """An architecture that is not this machine's, for the second entry of a multi-arch index."""
    return "arm64" if host_arch() == "amd64" else "amd64"


# The whiteout image's command: layer 2 deletes /data/gone.txt (a .wh. file) and hides all of layer 1's /old (an
# opaque whiteout), while what it adds itself and what layer 1 added elsewhere stay.
WHITEOUT_CHECK = """for f in /data/gone.txt /old/a.txt; do [ ! -e "$f" ] || { echo "still there: $f"; exit 1; }; done
for f in /data/kept.txt /old/new.txt /etc/marker; do [ -e "$f" ] || { echo "missing: $f"; exit 1; }; done
echo """ + hello_line("whiteout")


def build_runnable_catalog():
    """The runnable images by key: `pause` (a sandbox image that sleeps until killed), `hello` (prints
    hello_line("hello")), `whiteout` (3 layers with a whiteout and an opaque whiteout; prints hello_line("whiteout")
    when both took effect) and `multi-hello` (an index over this machine's architecture and another one; each entry
    prints hello_line(f"multi-hello-<its arch>"), so the output shows which entry a runtime chose). All share the
    busybox layer."""
    with open(BUSYBOX, "rb") as f:
        busybox = f.read()
    base = Layer([("bin", None), ("bin/busybox", busybox, 0o755), ("bin/sh", ("symlink", "busybox"))])
    data = Layer([("data", None), ("data/gone.txt", b"deleted by the next layer\n"), ("data/kept.txt", b"kept\n"),
                  ("old", None), ("old/a.txt", b"hidden by an opaque whiteout\n")])
    top = Layer([("data", None), ("data/.wh.gone.txt", b""), ("etc", None), ("etc/marker", b"top layer\n"),
                 ("old", None), ("old/.wh..wh..opq", b""), ("old/new.txt", b"added with the opaque whiteout\n")])

    cat = {
        "pause": Image("pause", [base], cmd=[BUSYBOX, "sleep", "2147483647"]),
        "hello": Image("hello", [base], cmd=[BUSYBOX, "echo", hello_line("hello")]),
        "whiteout": Image("whiteout", [base, data, top], cmd=[BUSYBOX, "sh", "-c", WHITEOUT_CHECK]),
    }
    cat["multi-hello"] = Index("multi-hello", [
        Image("multi-hello", [base], arch=arch, extra_env=[f"ARCH={arch}"],
              cmd=[BUSYBOX, "echo", hello_line(f"multi-hello-{arch}")])
        for arch in (host_arch(), other_arch())])
    return cat


class PushedRunnable(PushedImage):
    """A runnable image as it is in a registry; `output` is the line its command prints on this machine (None for
    pause, which prints nothing)."""

    def __init__(self, image, registry_host, repo, tags, manifest_digest, output):
        super().__init__(image, registry_host, repo, tags, manifest_digest)
        self.output = output


# key -> (repository, tags, manifest format or None for unchanged OCI). hello-docker is hello as Docker schema 2.
RUNNABLE_PUSH_PLAN = {
    "pause": ("crimage-test/pause", ["1"], None),
    "hello": ("crimage-test/hello", ["1"], None),
    "hello-docker": ("crimage-test/hello-docker", ["1"], "v2s2"),
    "whiteout": ("crimage-test/whiteout", ["1"], None),
    "multi-hello": ("crimage-test/multi-hello", ["1"], None),
}


def _served_digest(host, repo, tag, creds):
    headers = {"Accept": ACCEPT_ALL}
    if creds:
        headers["Authorization"] = "Basic " + base64.b64encode(creds.encode()).decode()
    req = urllib.request.Request(f"http://{host}/v2/{repo}/manifests/{tag}", method="HEAD", headers=headers)
    with urllib.request.urlopen(req, timeout=30) as resp:
        return resp.headers["Docker-Content-Digest"]


def push_runnable(workdir, registry_host, creds=None):
    """Generates the runnable images, pushes them to `registry_host` (with `creds` "user:password" to one that
    requires HTTP Basic auth) and returns {key: PushedRunnable} for the keys of RUNNABLE_PUSH_PLAN.

    As in push_all, what the registry serves is read back and must be what was generated."""
    cat = build_runnable_catalog()
    os.makedirs(workdir, exist_ok=True)
    policy = _policy(workdir)
    tmp = os.path.join(workdir, "skopeo-tmp")
    os.makedirs(tmp, exist_ok=True)
    pushed = {}
    for key, (repo, tags, fmt) in RUNNABLE_PUSH_PLAN.items():
        source = "hello" if key == "hello-docker" else key
        image = cat[source]
        layout = os.path.join(workdir, "runnable-layouts", source)
        if not os.path.exists(os.path.join(layout, "index.json")):
            write_oci_layout(layout, image, "fixture")
        for tag in tags:
            skopeo_push(layout, "fixture", f"{registry_host}/{repo}:{tag}", policy, fmt=fmt, tmpdir=tmp, creds=creds)
        digest = _served_digest(registry_host, repo, tags[0], creds)
        if fmt is None and digest != image.manifest_digest:
            raise RuntimeError(f"{repo}: registry serves {digest}, generated {image.manifest_digest}")
        if source == "pause":
            output = None
        elif isinstance(image, Index):
            output = hello_line(f"multi-hello-{host_arch()}")
        else:
            output = hello_line(source)
        pushed[key] = PushedRunnable(image, registry_host, repo, tags, digest, output)
    return pushed
