"""Compare the deployed ONNX file with the reference int8 graph, in quantization steps, on this CPU or
on another one emulated by qemu-user (`cpu="haswell"`, `"nehalem"`, `"cortex-a72"`, `"neoverse-n1"`:
CPUS): `run_file`, `layerwise`."""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np
import torch
from torch import fx

from fxquant.errors import FxQuantError
from fxquant.numerics import dequantize


def ort_session(path, *, threads: int | None = None, optimized_path: str | None = None, level: str = "extended"):
    """An ONNX Runtime CPU session (quiet), optionally saving the optimised graph to `optimized_path`."""
    import onnxruntime as ort

    levels = {"basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC, "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
              "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL}
    so = ort.SessionOptions()
    so.log_severity_level = 3
    so.graph_optimization_level = levels[level]
    if threads:
        so.intra_op_num_threads = threads
        so.inter_op_num_threads = 1
    if optimized_path:
        so.optimized_model_filepath = str(optimized_path)
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def run_onnx(session, *inputs: torch.Tensor) -> np.ndarray:
    names = [i.name for i in session.get_inputs()]
    return session.run(None, {n: t.detach().cpu().numpy() for n, t in zip(names, inputs)})[0]


def output_scale(int8: fx.GraphModule) -> float | None:
    """The quantization step of the int8 graph's (first) output, when it ends in a dequantize."""
    out = next(n for n in int8.graph.nodes if n.op == "output").args[0]
    out = out[0] if isinstance(out, (tuple, list)) else out
    if not (isinstance(out, fx.Node) and out.target is dequantize):
        return None
    scale = getattr(int8, out.args[1].target)
    return float(scale) if scale.numel() == 1 else None


@dataclass(frozen=True)
class Agreement:
    max_steps: float  # largest |a - b| in output quantization steps
    within_one_step: float  # fraction of elements with |a - b| <= 1 step
    top1: float  # fraction of rows with the same argmax

    def __str__(self):
        return f"max {self.max_steps:.2f} steps, {100 * self.within_one_step:.3f}% within 1 step, top-1 agreement {100 * self.top1:.2f}%"


def agreement(reference, other, step: float) -> Agreement:
    a, b = np.asarray(reference, dtype=np.float64), np.asarray(other, dtype=np.float64)
    steps = np.abs(a - b) / step
    tol = 1 + 1e-4  # the float rounding of (q - zp) * scale itself
    top1 = float((a.reshape(len(a), -1).argmax(1) == b.reshape(len(b), -1).argmax(1)).mean())
    return Agreement(float(steps.max()), float((steps <= tol).mean()), top1)


# ------------------------------------------------------------------ other CPUs, emulated

# ONNX Runtime picks its integer kernels by the CPU's feature bits at run time, so a file's numbers depend on
# the CPU that runs it. qemu-user (Debian package qemu-user) runs a program as another CPU model and ORT
# reads the emulated CPUID (x86-64) or HWCAP (aarch64): its numerics are those of that CPU, bit for bit (its
# speed is not). Only models whose instructions qemu 7's TCG implements are listed (no AVX-512, no SVE2).
@dataclass(frozen=True)
class EmulatedCpu:
    machine: str  # "x86_64" or "aarch64": which qemu-user program runs it
    model: str  # qemu's -cpu name
    doc: str


CPUS = {
    "haswell": EmulatedCpu("x86_64", "Haswell", "AVX2 without VNNI (AMD Zen 2/3, Intel before Cascade Lake): u8 x s8 pairs summed in int16"),
    "nehalem": EmulatedCpu("x86_64", "Nehalem", "SSE4.2, no AVX: MLAS's SSE kernels"),
    "cortex-a72": EmulatedCpu("aarch64", "cortex-a72", "Armv8.0-A NEON without dot product (AWS Graviton 1, Raspberry Pi 4)"),
    "neoverse-n1": EmulatedCpu("aarch64", "neoverse-n1", "Armv8.2-A with dot product, UDOT/SDOT (AWS Graviton 2, Ampere Altra)"),
}
EMULATED_TIMEOUT_S = 900.0  # one run under emulation; a hung worker is killed and the call raises


def aarch64_root() -> str:
    """Where the Arm64 Python, numpy and onnxruntime that Arm CPUs are emulated with live: $FXQUANT_AARCH64_ROOT,
    else `aarch64` in this Python's environment (sys.prefix); `python -m fxquant.tools.aarch64_root` builds it."""
    import sys

    return os.environ.get("FXQUANT_AARCH64_ROOT") or os.path.join(sys.prefix, "aarch64")


def _command(cpu: str) -> list[str]:
    """The qemu-user command line that starts a Python for `cpu` (FxQuantError saying what to install if it cannot)."""
    import platform
    import shutil
    import sys

    emulated_cpu = CPUS[cpu]
    if platform.machine() not in ("x86_64", "AMD64"):
        raise FxQuantError(f"cpu={cpu!r}: emulating other CPUs needs an x86-64 host (this is {platform.machine()})")
    qemu = shutil.which(f"qemu-{emulated_cpu.machine}")
    if qemu is None:
        raise FxQuantError(f"cpu={cpu!r} runs ONNX Runtime under qemu-{emulated_cpu.machine}, which is not installed: "
                           "install the qemu-user package (apt-get install qemu-user), or pass cpu=None")
    if emulated_cpu.machine == "x86_64":
        return [qemu, "-cpu", emulated_cpu.model, sys.executable]
    root = aarch64_root()
    python = os.path.join(root, "usr", "bin", f"python{sys.version_info.major}.{sys.version_info.minor}")
    if not os.path.exists(os.path.join(root, ".ready")) or not os.path.exists(python):
        raise FxQuantError(f"cpu={cpu!r} runs ONNX Runtime in an Arm64 Python under qemu-aarch64, and {root} holds none: "
                           "build it with `python -m fxquant.tools.aarch64_root` (Debian/Ubuntu, ~60 MB; `make test` does), "
                           "or point FXQUANT_AARCH64_ROOT at one")
    return [qemu, "-cpu", emulated_cpu.model, "-L", root, "-E", f"PYTHONPATH={os.path.join(root, 'site')}", python]


def host_isa() -> str:
    """The integer-kernel ISA of this CPU, as ONNX Runtime's MLAS dispatch sees it: "AVX-512 VNNI",
    "AVX-VNNI", "AVX-512 (no VNNI)", "AVX2 (no VNNI)", "SSE4", "Arm NEON + dot product", "Arm NEON", or the
    machine name elsewhere."""
    import platform

    from fxquant import ort_worker

    return ort_worker._isa() if platform.machine() in ("x86_64", "AMD64", "aarch64", "arm64") else platform.machine()


class EmulatedRuntime:
    """ONNX Runtime in a long-lived process under `qemu-x86_64|qemu-aarch64 -cpu MODEL` (fxquant/ort_worker.py).

    Starting Python with onnxruntime under emulation takes seconds, so one process serves every run
    for its CPU (`emulated(cpu)` keeps one per CPU for the life of this process). Arrays travel
    through .npz files in a private folder; each run has a timeout, after which the process is killed.
    """

    def __init__(self, cpu: str, timeout: float = EMULATED_TIMEOUT_S):
        import subprocess
        import tempfile

        if cpu not in CPUS:
            raise FxQuantError(f"cpu={cpu!r}: expected None (this CPU) or one of {sorted(CPUS)}: "
                               + "; ".join(f"{k}: {v.doc}" for k, v in CPUS.items()))
        command = _command(cpu)
        from fxquant import ort_worker

        self.cpu, self.timeout, self.folder = cpu, timeout, tempfile.mkdtemp(prefix=f"fxquant-{cpu}-")
        self.qemu = os.path.basename(command[0])
        source = open(ort_worker.__file__).read()
        self.process = subprocess.Popen(command + ["-c", source], cwd=self.folder,
                                        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        self.isa = self._reply("start")["isa"]
        self.count = 0

    def _reply(self, what: str) -> dict:
        import json
        import select

        ready, _, _ = select.select([self.process.stdout], [], [], self.timeout)
        line = self.process.stdout.readline() if ready else ""
        if not line:
            self.close()
            why = f"no answer in {self.timeout:.0f} s" if not ready else f"it exited with {self.process.poll()}"
            raise FxQuantError(f"cpu={self.cpu!r}: ONNX Runtime under {self.qemu} failed during {what}: {why}")
        reply = json.loads(line)
        if not reply["ok"]:
            raise FxQuantError(f"cpu={self.cpu!r}: ONNX Runtime under {self.qemu} failed on {what}: {reply['error']}")
        return reply

    def run(self, path, feeds: dict, *, threads: int = 1, level: str = "extended") -> dict:
        """{output name: array} of the file at `path` on `feeds` ({input name: array})."""
        import json

        if self.process.poll() is not None:
            raise FxQuantError(f"cpu={self.cpu!r}: the emulated ONNX Runtime process has stopped; start a new one")
        self.count += 1
        inputs, outputs = (os.path.join(self.folder, f"{self.count}-{kind}.npz") for kind in ("in", "out"))
        np.savez(inputs, **feeds)
        request = {"model": os.path.abspath(os.fspath(path)), "inputs": inputs, "outputs": outputs, "threads": threads, "level": level}
        self.process.stdin.write(json.dumps(request) + "\n")
        self.process.stdin.flush()
        try:
            self._reply(f"'{path}'")
            with np.load(outputs) as result:
                return {name: result[name] for name in result.files}
        finally:
            for f in (inputs, outputs):
                if os.path.exists(f):
                    os.remove(f)

    def close(self) -> None:
        import shutil

        if self.process.poll() is None:
            self.process.kill()
        self.process.wait()
        shutil.rmtree(self.folder, ignore_errors=True)


_RUNTIMES: dict[str, EmulatedRuntime] = {}


def emulated(cpu: str) -> EmulatedRuntime:
    """The EmulatedRuntime of `cpu`, started on first use and closed when this process exits."""
    import atexit

    runtime = _RUNTIMES.get(cpu)
    if runtime is None or runtime.process.poll() is not None:
        if not _RUNTIMES:
            atexit.register(lambda: [r.close() for r in _RUNTIMES.values()])
        runtime = _RUNTIMES[cpu] = EmulatedRuntime(cpu)
    return runtime


def run_file(path, inputs, *, cpu: str | None = None, threads: int = 1, level: str = "extended") -> dict:
    """Run the ONNX file at `path` in ONNX Runtime's CPU provider on `inputs` (tensors or arrays, in the
    graph's input order) and return {output name: array}. `cpu` None runs here; a name of CPUS runs it as
    that CPU under qemu-user (FxQuantError naming the package when qemu is missing; never hangs: each
    emulated run has a timeout)."""
    inputs = (inputs,) if isinstance(inputs, (torch.Tensor, np.ndarray)) else tuple(inputs)
    arrays = [t.detach().cpu().numpy() if isinstance(t, torch.Tensor) else np.asarray(t) for t in inputs]
    if cpu is None or cpu == "native":
        session = ort_session(path, threads=threads, level=level)
        names = [i.name for i in session.get_inputs()]
        values = session.run(None, dict(zip(names, arrays)))
        return dict(zip([o.name for o in session.get_outputs()], values))
    import onnx

    names = [i.name for i in onnx.load(os.fspath(path), load_external_data=False).graph.input]
    return emulated(cpu).run(path, dict(zip(names, arrays)), threads=threads, level=level)


# ------------------------------------------------------------------ the teacher-forced layer check


@dataclass(frozen=True)
class Layerwise:
    """ONNX Runtime against the reference int8 graph, one quantized tensor at a time (see layerwise)."""

    max_steps: float  # the largest difference at any QuantizeLinear, in quantization steps (codes)
    worst: str  # the node where it is ("" when every layer agrees exactly)
    steps: dict  # {node name: largest difference in steps} for every QuantizeLinear both have
    outputs: list  # ONNX Runtime's graph outputs of the file as it is (no tensor exposed), in order (arrays)
    cpu: str  # "native" or the emulated CPU
    isa: str  # the integer-kernel ISA that ran it


def layerwise(int8: fx.GraphModule, path, inputs, *, cpu: str | None = None, level: str = "extended") -> Layerwise:
    """Teacher-forced agreement of the file at `path` with the reference int8 graph `int8` on `inputs`.

    ONNX Runtime runs the file with every QuantizeLinear output exposed (on `cpu`, see run_file); the
    reference int8 graph then runs with each of its quantize nodes replaced by ONNX Runtime's value of it,
    so every op computes from the very integers ONNX Runtime computed from, and its quantized output is
    compared with ONNX Runtime's, in codes (quantization steps). Unlike the output SQNR this does not
    compound: a random network that amplifies the one-step rounding differences of two float
    implementations block after block still agrees within one step at every layer when the file computes
    what the reference does. Node names match because fxquant names each ONNX node after its FX node.
    `level` is ONNX Runtime's graph optimization level ("basic" runs Q/DQ as written, with no integer fusion).
    """
    import tempfile

    import onnx

    from fxquant.numerics import quantize

    inputs = (inputs,) if isinstance(inputs, torch.Tensor) else tuple(inputs)
    model = onnx.load(os.fspath(path))
    n_outputs = len(model.graph.output)
    names = [n.output[0] for n in model.graph.node if n.op_type == "QuantizeLinear"]
    model.graph.output.extend(onnx.helper.make_empty_tensor_value_info(n) for n in names)
    with tempfile.TemporaryDirectory(prefix="fxquant-layerwise-") as folder:
        exposed = os.path.join(folder, "exposed.onnx")
        onnx.save_model(model, exposed)
        ran = run_file(exposed, inputs, cpu=cpu, level=level)
    deployed = run_file(path, inputs, cpu=cpu, level=level)  # exposing a tensor can change what ORT fuses
    ort_values = {name: ran[name] for name in names if name in ran}
    steps: dict[str, float] = {}

    class Forced(fx.Interpreter):
        def run_node(self, n):
            value = super().run_node(n)
            if n.target is quantize and n.name in ort_values:
                theirs = torch.from_numpy(np.asarray(ort_values[n.name]))
                steps[n.name] = float((value.to(torch.int32) - theirs.to(torch.int32)).abs().max()) if value.numel() else 0.0
                value = theirs.to(value.dtype)
            return value

    with torch.no_grad():
        Forced(int8).run(*inputs)
    worst = max(steps, key=steps.get, default="")
    outputs = [deployed[o.name] for o in model.graph.output[:n_outputs]]
    isa = host_isa() if cpu in (None, "native") else emulated(cpu).isa
    return Layerwise(steps.get(worst, 0.0), worst if steps.get(worst) else "", steps, outputs, cpu or "native", isa)


def layerwise_steps(int8: fx.GraphModule, path, inputs, *, cpu: str | None = None) -> tuple[float, str]:
    """(largest difference in quantization steps, the node where it is): `layerwise`'s summary."""
    found = layerwise(int8, path, inputs, cpu=cpu)
    return found.max_steps, found.worst
