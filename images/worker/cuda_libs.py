#!/usr/bin/env python3
"""Unpacks the CUDA libraries moe-worker loads from NVIDIA's wheels (images/worker/Dockerfile).

Usage: cuda_libs.py WHEEL_DIR OUT_DIR  ->  OUT_DIR/lib64/*.so*, OUT_DIR/licenses/<wheel>/
"""
import os
import sys
import zipfile

# What cudarc dlopens (libnvrtc.so.13, libcublas.so.13, libnccl.so) and what those load.
LIBS = {"libnvrtc.so.13", "libnvrtc-builtins.so.13.0", "libcublas.so.13", "libcublasLt.so.13",
        "libnccl.so.2"}

wheels, out = sys.argv[1], sys.argv[2]
os.makedirs(f"{out}/lib64", exist_ok=True)
for whl in sorted(w for w in os.listdir(wheels) if w.endswith(".whl")):
    with zipfile.ZipFile(os.path.join(wheels, whl)) as z:
        for name in z.namelist():
            base = os.path.basename(name)
            if base in LIBS and "/lib/" in name:
                with open(f"{out}/lib64/{base}", "wb") as f:
                    f.write(z.read(name))
                os.chmod(f"{out}/lib64/{base}", 0o755)
            elif ".dist-info/" in name and name.endswith("License.txt"):
                d = f"{out}/licenses/{whl.split('-')[0]}"
                os.makedirs(d, exist_ok=True)
                with open(f"{d}/License.txt", "wb") as f:
                    f.write(z.read(name))
missing = LIBS - set(os.listdir(f"{out}/lib64"))
if missing:
    sys.exit(f"cuda_libs.py: the wheels lack {sorted(missing)}")
# cudarc looks for libnccl.so (and .so.<CUDA major>), not NCCL's soname libnccl.so.2.
os.symlink("libnccl.so.2", f"{out}/lib64/libnccl.so")
