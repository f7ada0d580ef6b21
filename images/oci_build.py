#!/usr/bin/env python3
"""Assembles the project's OCI images without a container engine (used by `scripts/images`).

Each image is a few gzip-compressed tar layers written deterministically (entries sorted,
owner root unless stated, fixed mtimes: the commit's time for the binary, 0 for the rest; gzip
header without name or time), so two builds of one commit give byte-identical layers, and a
layer whose inputs did not change keeps its digest (the base and CUDA layers across commits):

  base    the runtime files of Debian bookworm's libc6, libgcc-s1 and libstdc++6 (what
          gcr.io/distroless/cc-debian12 holds, minus what the binaries do not use), an
          /etc/passwd and /etc/group with the non-root user 65532, /tmp, /home/nonroot.
  cuda    (worker) NVRTC, cuBLAS/cuBLASLt and NCCL from NVIDIA's PyPI wheels, in
          /usr/local/cuda/lib64, with their licence files. libcuda comes from the node's driver.
  app     the release binary in /usr/local/bin.

The output is an OCI image layout in a tar archive (`oci-layout`, `index.json`,
`blobs/sha256/...`), which `ctr images import`, `skopeo copy oci-archive:...` and
`podman load` read. Layers are cached in --cache by the digest of their inputs.

Usage (see scripts/images for the inputs):
  oci_build.py --image NAME:TAG --kind operator|worker --binary PATH --debs DIR
               [--wheels DIR] --cache DIR --out FILE --epoch N --source URL --revision SHA
"""

import argparse
import datetime
import gzip
import hashlib
import io
import json
import os
import stat
import subprocess
import sys
import tarfile
import tempfile

NONROOT = 65532
GZIP_LEVEL = 6
# Part of every layer's cache key: bump when what goes into a layer changes.
LAYOUT = "1"
# File times in the base and CUDA layers: their content does not depend on the commit, so
# their digests stay the same across commits (cache hits, registry deduplication). The app
# layer uses the commit's time.
BASE_EPOCH = 0

# Files taken from each Debian package's data archive (path prefixes inside the package),
# plus its copyright file. Everything else (docs, locales, gconv, headers) stays out.
DEB_FILES = {
    "libc6": ["lib/x86_64-linux-gnu/", "lib64/"],
    "libgcc-s1": ["lib/x86_64-linux-gnu/"],
    "libstdc++6": ["usr/lib/x86_64-linux-gnu/libstdc++.so"],
}
# From the CUDA wheels: what cudarc dlopens (libnvrtc.so.13, libcublas.so.13, libnccl.so)
# and what those load (libnvrtc-builtins, libcublasLt).
CUDA_LIBS = [
    "nvidia/cu13/lib/libnvrtc.so.13",
    "nvidia/cu13/lib/libnvrtc-builtins.so.13.0",
    "nvidia/cu13/lib/libcublas.so.13",
    "nvidia/cu13/lib/libcublasLt.so.13",
    "nvidia/nccl/lib/libnccl.so.2",
]
CUDA_DIR = "usr/local/cuda/lib64"


class Layer:
    """An in-memory description of a layer: path -> (type, content, mode, uid)."""

    def __init__(self, epoch):
        self.epoch = epoch
        self.entries = {}

    def _parents(self, path):
        parts = path.split("/")[:-1]
        for i in range(1, len(parts) + 1):
            d = "/".join(parts[:i])
            self.entries.setdefault(d, ("dir", None, 0o755, 0))

    def dir(self, path, mode=0o755, uid=0):
        self._parents(path)
        self.entries[path] = ("dir", None, mode, uid)

    def file(self, path, data, mode=0o644):
        self._parents(path)
        self.entries[path] = ("file", data, mode, 0)

    def file_from(self, path, src, mode=None):
        """A file whose content is read lazily from `src` (large libraries)."""
        if mode is None:
            mode = 0o755 if os.stat(src).st_mode & 0o111 else 0o644
        self._parents(path)
        self.entries[path] = ("path", src, mode, 0)

    def symlink(self, path, target):
        self._parents(path)
        self.entries[path] = ("symlink", target, 0o777, 0)

    def write_tar(self, fileobj):
        with tarfile.open(fileobj=fileobj, mode="w|", format=tarfile.GNU_FORMAT) as tar:
            for path in sorted(self.entries):
                kind, content, mode, uid = self.entries[path]
                ti = tarfile.TarInfo(path)
                ti.mtime = self.epoch
                ti.uid = ti.gid = uid
                ti.uname = ti.gname = ""
                ti.mode = mode
                if kind == "dir":
                    ti.type = tarfile.DIRTYPE
                    tar.addfile(ti)
                elif kind == "symlink":
                    ti.type = tarfile.SYMTYPE
                    ti.linkname = content
                    tar.addfile(ti)
                elif kind == "file":
                    ti.size = len(content)
                    tar.addfile(ti, io.BytesIO(content))
                else:
                    ti.size = os.path.getsize(content)
                    with open(content, "rb") as f:
                        tar.addfile(ti, f)


class HashingWriter:
    """Writes through to `inner` while hashing and counting the bytes."""

    def __init__(self, inner):
        self.inner, self.sha, self.size = inner, hashlib.sha256(), 0

    def write(self, b):
        self.sha.update(b)
        self.size += len(b)
        return self.inner.write(b) if self.inner is not None else len(b)

    def flush(self):
        pass


def build_layer(layer, cache, key):
    """Writes the layer's tar.gz into the cache (once per key); returns its descriptor."""
    meta_path = os.path.join(cache, f"layer-{key}.json")
    if os.path.exists(meta_path):
        with open(meta_path) as f:
            meta = json.load(f)
        if os.path.exists(os.path.join(cache, "blobs", meta["digest"])):
            return meta
    os.makedirs(os.path.join(cache, "blobs"), exist_ok=True)
    tmp = tempfile.NamedTemporaryFile(dir=cache, delete=False)
    try:
        compressed = HashingWriter(tmp)
        with gzip.GzipFile(fileobj=compressed, mode="wb", mtime=0, filename="",
                           compresslevel=GZIP_LEVEL) as gz:
            diff = HashingWriter(gz)
            layer.write_tar(diff)
        tmp.close()
        meta = {
            "digest": "sha256:" + compressed.sha.hexdigest(),
            "size": compressed.size,
            "diff_id": "sha256:" + diff.sha.hexdigest(),
        }
        os.replace(tmp.name, os.path.join(cache, "blobs", meta["digest"]))
    finally:
        if os.path.exists(tmp.name):
            os.unlink(tmp.name)
    with open(meta_path, "w") as f:
        json.dump(meta, f)
    return meta


def sha256_file(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def deb_path(debs, pkg):
    found = [f for f in os.listdir(debs) if f.startswith(pkg.replace("+", "%2b") + "_")
             or f.startswith(pkg + "_")]
    if len(found) != 1:
        sys.exit(f"oci_build: expected one {pkg}_*.deb in {debs}, found {found}")
    return os.path.join(debs, found[0])


def base_layer(epoch, debs, tmpdir):
    layer = Layer(epoch)
    for pkg, prefixes in DEB_FILES.items():
        deb = deb_path(debs, pkg)
        root = os.path.join(tmpdir, pkg)
        subprocess.run(["dpkg-deb", "-x", deb, root], check=True)
        for dirpath, dirnames, filenames in os.walk(root):
            dirnames.sort()
            for name in sorted(filenames + [d for d in dirnames
                                            if os.path.islink(os.path.join(dirpath, d))]):
                full = os.path.join(dirpath, name)
                rel = os.path.relpath(full, root)
                copyright_file = rel == f"usr/share/doc/{pkg}/copyright"
                if not copyright_file and not any(rel.startswith(p) for p in prefixes):
                    continue
                if os.path.islink(full):
                    layer.symlink(rel, os.readlink(full))
                elif stat.S_ISREG(os.lstat(full).st_mode):
                    layer.file_from(rel, full)
    layer.file("etc/passwd", (
        "root:x:0:0:root:/root:/sbin/nologin\n"
        f"nonroot:x:{NONROOT}:{NONROOT}:nonroot:/home/nonroot:/sbin/nologin\n").encode())
    layer.file("etc/group", f"root:x:0:\nnonroot:x:{NONROOT}:\n".encode())
    # getaddrinfo: /etc/hosts first, then DNS (the worker resolves its rank 0's pod DNS name).
    layer.file("etc/nsswitch.conf", b"hosts: files dns\n")
    layer.dir("tmp", mode=0o1777)
    layer.dir("home/nonroot", mode=0o700, uid=NONROOT)
    layer.dir("root", mode=0o700)
    return layer


def cuda_layer(epoch, wheels, tmpdir):
    import zipfile

    layer = Layer(epoch)
    for whl in sorted(os.listdir(wheels)):
        if not whl.endswith(".whl"):
            continue
        with zipfile.ZipFile(os.path.join(wheels, whl)) as z:
            names = z.namelist()
            dist = whl.split("-")[0]
            for name in names:
                if name in CUDA_LIBS:
                    out = z.extract(name, tmpdir)
                    layer.file_from(f"{CUDA_DIR}/{os.path.basename(name)}", out, mode=0o755)
                elif ".dist-info/" in name and name.endswith("License.txt"):
                    layer.file(f"usr/local/cuda/licenses/{dist}/License.txt", z.read(name))
    missing = [lib for lib in CUDA_LIBS
               if f"{CUDA_DIR}/{os.path.basename(lib)}" not in layer.entries]
    if missing:
        sys.exit(f"oci_build: the wheels in {wheels} lack {missing}")
    # cudarc looks for libnccl.so (and .so.<cuda major>), not NCCL's own soname .so.2.
    layer.symlink(f"{CUDA_DIR}/libnccl.so", "libnccl.so.2")
    return layer


def app_layer(epoch, binary, name, tmpdir):
    """The binary with its DWARF debug info removed (symbols stay, for backtraces)."""
    layer = Layer(epoch)
    stripped = os.path.join(tmpdir, name)
    subprocess.run(["objcopy", "--strip-debug", binary, stripped], check=True)
    layer.file_from(f"usr/local/bin/{name}", stripped, mode=0o755)
    return layer


def blob(out_blobs, data):
    digest = hashlib.sha256(data).hexdigest()
    with open(os.path.join(out_blobs, digest), "wb") as f:
        f.write(data)
    return {"digest": "sha256:" + digest, "size": len(data)}


def canonical(obj):
    return json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()


def layers_for(args, name, tmpdir):
    """(description, descriptor) of each layer of the image, built or taken from the cache.
    Cache keys: the layer's inputs (package files, wheel files, binary) and LAYOUT."""
    def key(epoch, *parts):
        return hashlib.sha256("|".join((LAYOUT, str(epoch)) + parts).encode()).hexdigest()[:32]

    if args.kind == "pause":
        layer = Layer(args.epoch)
        layer.file_from("pause", args.binary, mode=0o755)
        return [("pause", build_layer(layer, args.cache,
                                      "pause-" + key(args.epoch, sha256_file(args.binary))))]
    layers = []
    debs = [sha256_file(deb_path(args.debs, p)) for p in DEB_FILES]
    layers.append(("base: libc6, libgcc-s1, libstdc++6 (Debian 12), user 65532",
                   build_layer(base_layer(BASE_EPOCH, args.debs, tmpdir), args.cache,
                               "base-" + key(BASE_EPOCH, *debs))))
    if args.kind == "worker":
        wheels = sorted(w for w in os.listdir(args.wheels) if w.endswith(".whl"))
        hashes = [sha256_file(os.path.join(args.wheels, w)) for w in wheels]
        layers.append(("cuda: NVRTC, cuBLAS, NCCL from " + ", ".join(wheels),
                       build_layer(cuda_layer(BASE_EPOCH, args.wheels, tmpdir), args.cache,
                                   "cuda-" + key(BASE_EPOCH, *hashes, *CUDA_LIBS))))
    layers.append((f"app: /usr/local/bin/{name}",
                   build_layer(app_layer(args.epoch, args.binary, name, tmpdir), args.cache,
                               f"app-{name}-" + key(args.epoch, sha256_file(args.binary)))))
    return layers


def unchanged(archive, index):
    """Whether `archive` is an image archive with exactly this index.json."""
    try:
        with tarfile.open(archive) as tar:
            member = tar.next()
            while member is not None and member.name != "index.json":
                member = tar.next()
            return member is not None and tar.extractfile(member).read() == index
    except (OSError, tarfile.TarError):
        return False


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--image", required=True, help="full name with tag, e.g. ghcr.io/x/y:1.0")
    ap.add_argument("--kind", required=True, choices=["operator", "worker", "pause"],
                    help="pause: the e2e node's pod sandbox image (one static binary, no base)")
    ap.add_argument("--binary", required=True)
    ap.add_argument("--debs")
    ap.add_argument("--wheels")
    ap.add_argument("--cache", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--epoch", type=int, required=True)
    ap.add_argument("--source", required=True)
    ap.add_argument("--revision", required=True)
    args = ap.parse_args()
    if args.kind == "worker" and not args.wheels:
        sys.exit("oci_build: --wheels is required for the worker image")
    if args.kind != "pause" and not args.debs:
        sys.exit("oci_build: --debs is required for the operator and worker images")

    name = "pause" if args.kind == "pause" else f"moe-{args.kind}"
    tag = args.image.rpartition(":")[2]
    created = datetime.datetime.fromtimestamp(args.epoch, datetime.timezone.utc).strftime(
        "%Y-%m-%dT%H:%M:%SZ")
    os.makedirs(args.cache, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=args.cache) as tmpdir:
        layers = layers_for(args, name, tmpdir)

    labels = {
        "org.opencontainers.image.title": name,
        "org.opencontainers.image.description": {
            "pause": "the pod sandbox of the moe-operator e2e node",
            "operator": "moe-operator: Kubernetes operator for MoE expert-parallel deployments",
            "worker": "moe-worker: an expert-parallel rank (CUDA, or CPU without a GPU)",
        }[args.kind],
        "org.opencontainers.image.source": args.source,
        "org.opencontainers.image.url": args.source,
        "org.opencontainers.image.version": tag,
        "org.opencontainers.image.revision": args.revision,
        "org.opencontainers.image.created": created,
        "org.opencontainers.image.licenses": "Apache-2.0",
    }
    env = ["PATH=/usr/local/bin:/usr/bin:/bin"]
    entrypoint = ["/pause"] if args.kind == "pause" else [f"/usr/local/bin/{name}"]
    if args.kind == "worker":
        env.append(f"LD_LIBRARY_PATH=/{CUDA_DIR}")
        # The NVIDIA container toolkit mounts the driver (libcuda) when these are set.
        env += ["NVIDIA_VISIBLE_DEVICES=all", "NVIDIA_DRIVER_CAPABILITIES=compute,utility"]
    config = {
        "created": created,
        "architecture": "amd64",
        "os": "linux",
        "config": {
            "User": "65535:65535" if args.kind == "pause" else f"{NONROOT}:{NONROOT}",
            "Env": env,
            "Entrypoint": entrypoint,
            "WorkingDir": "/" if args.kind == "pause" else "/home/nonroot",
            "Labels": labels,
        },
        "rootfs": {"type": "layers", "diff_ids": [m["diff_id"] for _, m in layers]},
        "history": [{"created": created, "created_by": f"images/oci_build.py ({what})"}
                    for what, _ in layers],
    }

    out_dir = tempfile.mkdtemp(dir=os.path.dirname(os.path.abspath(args.out)))
    try:
        blobs = os.path.join(out_dir, "blobs", "sha256")
        os.makedirs(blobs)
        config_desc = blob(blobs, canonical(config))
        manifest = {
            "schemaVersion": 2,
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "config": {"mediaType": "application/vnd.oci.image.config.v1+json", **config_desc},
            "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip",
                        "digest": m["digest"], "size": m["size"]} for _, m in layers],
            "annotations": labels,
        }
        manifest_desc = blob(blobs, canonical(manifest))
        index = {
            "schemaVersion": 2,
            "mediaType": "application/vnd.oci.image.index.v1+json",
            "manifests": [{
                "mediaType": "application/vnd.oci.image.manifest.v1+json",
                **manifest_desc,
                "platform": {"architecture": "amd64", "os": "linux"},
                "annotations": {
                    # containerd (ctr import) names the image after this...
                    "io.containerd.image.name": args.image,
                    # ...skopeo/podman (oci-archive:FILE) after this.
                    "org.opencontainers.image.ref.name": tag,
                },
            }],
        }
        with open(os.path.join(out_dir, "index.json"), "wb") as f:
            f.write(canonical(index))
        with open(os.path.join(out_dir, "oci-layout"), "wb") as f:
            f.write(canonical({"imageLayoutVersion": "1.0.0"}))
        if unchanged(args.out, canonical(index)):
            # Same manifest (so same layers, config and name): keep the archive as it is.
            print(json.dumps({"image": args.image, "manifest": manifest_desc["digest"],
                              "unchanged": True,
                              "compressed_bytes": sum(m["size"] for _, m in layers),
                              "layers": [{"what": w, "digest": m["digest"], "size": m["size"]}
                                         for w, m in layers]}))
            return

        # The archive: metadata first, then blobs, sorted, fixed owner and times. Layer blobs
        # are read from the cache (not copied into out_dir).
        tmp_out = args.out + ".tmp"
        with tarfile.open(tmp_out, "w", format=tarfile.GNU_FORMAT) as tar:
            def add(arcname, path):
                ti = tar.gettarinfo(path, arcname)
                ti.mtime, ti.uid, ti.gid, ti.uname, ti.gname = args.epoch, 0, 0, "", ""
                ti.mode = 0o755 if ti.isdir() else 0o644
                if ti.isdir():
                    tar.addfile(ti)
                else:
                    with open(path, "rb") as f:
                        tar.addfile(ti, f)
            add("oci-layout", os.path.join(out_dir, "oci-layout"))
            add("index.json", os.path.join(out_dir, "index.json"))
            add("blobs", os.path.join(out_dir, "blobs"))
            add("blobs/sha256", blobs)
            entries = {os.path.basename(m["digest"].replace(":", "/")):
                       os.path.join(args.cache, "blobs", m["digest"]) for _, m in layers}
            for f in os.listdir(blobs):
                entries[f] = os.path.join(blobs, f)
            for digest in sorted(entries):
                add(f"blobs/sha256/{digest}", entries[digest])
        os.replace(tmp_out, args.out)
    finally:
        subprocess.run(["rm", "-rf", out_dir], check=True)

    total = sum(m["size"] for _, m in layers)
    print(json.dumps({
        "image": args.image,
        "manifest": manifest_desc["digest"],
        "compressed_bytes": total,
        "layers": [{"what": w, "digest": m["digest"], "size": m["size"]} for w, m in layers],
    }))


if __name__ == "__main__":
    main()
