"""Build the Arm64 root that fxquant.check runs ONNX Runtime in, under qemu-aarch64 (cpu="cortex-a72"...).

    python -m fxquant.tools.aarch64_root [DEST]      # default: fxquant.check.aarch64_root()

qemu-user runs an aarch64 program on an x86-64 host, but the program needs aarch64 libraries: this tool
puts Debian's arm64 Python (the same minor version as this Python, so the same wheels fit) and its
shared libraries in DEST (apt-get download + dpkg -x: nothing is installed on the host), and PyPI's
aarch64 wheels of the numpy and onnxruntime versions installed here in DEST/site. ONNX Runtime's CPU
detection reads /proc/cpuinfo and /sys/devices/system/cpu, which qemu-user passes through from the x86
host; parsed as an Arm CPU's they crash it, so DEST gets a one-core Arm description of both (qemu's
`-L DEST` serves a path from DEST when DEST holds it). The kernels ONNX Runtime then picks come from the
emulated CPU's feature bits (getauxval(AT_HWCAP)), which qemu sets for the `-cpu` model.

Needs apt-get and dpkg (Debian or Ubuntu) and access to the package mirrors and PyPI; about 60 MB.
Idempotent: DEST/.ready marks a finished root, and a failed build leaves no .ready.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile

# Debian's arm64 python3.X and the shared libraries it and its extension modules load
DEBS = ("python{v}-minimal", "libpython{v}-minimal", "libpython{v}-stdlib", "libc6", "libexpat1", "zlib1g", "libffi8",
        "libssl3", "libstdc++6", "libgcc-s1", "libbz2-1.0", "liblzma5", "libsqlite3-0", "libuuid1", "libncursesw6",
        "libtinfo6", "libreadline8", "libcrypt1")
CPUINFO = """processor\t: 0
BogoMIPS\t: 50.00
Features\t: fp asimd evtstrm aes pmull sha1 sha2 crc32 cpuid
CPU implementer\t: 0x41
CPU architecture: 8
CPU variant\t: 0x0
CPU part\t: 0xd08
CPU revision\t: 3

"""
SYSFS = {"possible": "0", "present": "0", "online": "0", "kernel_max": "0", "cpu0/topology/physical_package_id": "0",
         "cpu0/topology/cluster_cpus_list": "0", "cpu0/topology/core_siblings_list": "0", "cpu0/topology/thread_siblings_list": "0"}


def _run(cmd: list[str], **kw) -> None:
    print("+", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True, **kw)


def build(dest: str) -> str:
    """Build the root in `dest` (see the module docstring) and return `dest`; nothing to do if it is ready."""
    import numpy
    import onnxruntime

    if os.path.exists(os.path.join(dest, ".ready")):
        return dest
    for tool in ("apt-get", "dpkg"):
        if shutil.which(tool) is None:
            raise SystemExit(f"aarch64_root: needs {tool} (Debian or Ubuntu) to fetch Debian's arm64 Python")
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    os.makedirs(dest, exist_ok=True)
    with tempfile.TemporaryDirectory() as work:
        lists = os.path.join(work, "lists")
        os.makedirs(os.path.join(lists, "partial"))
        apt = ["apt-get", "-q", "-oAPT::Architecture=arm64", "-oAPT::Architectures=arm64", f"-oDir::State::Lists={lists}"]
        _run(apt + ["update"])
        debs = os.path.join(work, "debs")
        os.makedirs(debs)
        _run(apt + ["download"] + [d.format(v=version) for d in DEBS], cwd=debs)
        for deb in sorted(os.listdir(debs)):
            _run(["dpkg", "-x", os.path.join(debs, deb), dest])
        wheels = os.path.join(work, "wheels")
        platforms = [f"--platform=manylinux_2_{n}_aarch64" for n in (17, 27, 28)] + ["--platform=manylinux2014_aarch64"]
        pip = [sys.executable, "-m", "pip"]
        _run(pip + ["download", "-q", "--no-deps", "--only-binary=:all:", f"--python-version={version}", "--implementation=cp",
                    *platforms, "-d", wheels, f"numpy=={numpy.__version__}", f"onnxruntime=={onnxruntime.__version__}"])
        _run(pip + ["install", "-q", "--no-deps", "--no-compile", "--only-binary=:all:", "--upgrade", "--target",
                    os.path.join(dest, "site"), *platforms, *(os.path.join(wheels, w) for w in sorted(os.listdir(wheels)))])
    os.makedirs(os.path.join(dest, "proc"), exist_ok=True)
    with open(os.path.join(dest, "proc", "cpuinfo"), "w") as f:
        f.write(CPUINFO)
    for name, text in SYSFS.items():
        path = os.path.join(dest, "sys", "devices", "system", "cpu", name)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "w") as f:
            f.write(text + "\n")
    open(os.path.join(dest, ".ready"), "w").close()
    return dest


def main(argv=None) -> int:
    from fxquant.check import aarch64_root

    parser = argparse.ArgumentParser(prog="python -m fxquant.tools.aarch64_root", description=__doc__.split("\n")[0])
    parser.add_argument("dest", nargs="?", default=aarch64_root(), help="where to build it (default: %(default)s)")
    print(build(parser.parse_args(argv).dest))
    return 0


if __name__ == "__main__":
    sys.exit(main())
