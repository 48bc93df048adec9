"""A long-lived ONNX Runtime process that fxquant.check starts under qemu-user to run files as another CPU.

It imports only numpy and onnxruntime (torch would add ~10 s to every start under emulation) and is
started as `python -c <this file's source>`, so no module of the fxquant package is imported or
shadows the standard library. Protocol, one JSON object per line:

    request  (stdin):  {"model": path, "inputs": npz path, "outputs": npz path, "threads": int, "level": str}
    reply    (stdout): {"ok": true, "isa": str} or {"ok": false, "error": str}

The inputs .npz holds one array per graph input name; the outputs .npz gets one per graph output name.
An empty line or end of input ends the process.
"""

import json
import sys


def _isa() -> str:
    """The integer-kernel ISA this process sees, from CPUID (x86-64) or HWCAP (aarch64) as numpy's dispatcher
    read it (under qemu: the emulated CPU's, as ONNX Runtime's MLAS reads it; /proc/cpuinfo would still
    describe the host)."""
    import platform

    try:
        from numpy._core._multiarray_umath import __cpu_features__ as features
    except ImportError:  # numpy 1.x
        from numpy.core._multiarray_umath import __cpu_features__ as features
    if platform.machine() in ("aarch64", "arm64"):
        for flag, name in (("ASIMDDP", "Arm NEON + dot product"), ("ASIMD", "Arm NEON")):
            if features.get(flag):
                return name
        return platform.machine()
    for flag, name in (("AVX512VNNI", "AVX-512 VNNI"), ("AVXVNNI", "AVX-VNNI"), ("AVX512BW", "AVX-512 (no VNNI)"), ("AVX2", "AVX2 (no VNNI)"),
                       ("SSE41", "SSE4"), ("SSSE3", "SSSE3")):
        if features.get(flag):
            return name
    return "x86-64 baseline"


def main() -> None:
    import numpy as np
    import onnxruntime as ort

    levels = {"basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC, "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
              "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL}
    print(json.dumps({"ok": True, "isa": _isa()}), flush=True)  # ready
    for line in sys.stdin:
        if not line.strip():
            break
        try:
            request = json.loads(line)
            options = ort.SessionOptions()
            options.log_severity_level = 3
            options.graph_optimization_level = levels[request.get("level", "extended")]
            options.intra_op_num_threads = int(request.get("threads", 1))
            options.inter_op_num_threads = 1
            session = ort.InferenceSession(request["model"], options, providers=["CPUExecutionProvider"])
            with np.load(request["inputs"]) as feeds:
                values = session.run(None, {i.name: feeds[i.name] for i in session.get_inputs()})
            np.savez(request["outputs"], **{o.name: v for o, v in zip(session.get_outputs(), values)})
            print(json.dumps({"ok": True, "isa": _isa()}), flush=True)
        except Exception as exc:  # reported to the caller, which raises FxQuantError
            print(json.dumps({"ok": False, "error": f"{type(exc).__name__}: {exc}"}), flush=True)


if __name__ == "__main__":
    main()
