"""The examples of fxquant.tools.error_catalog: user code that makes fxquant raise an FxQuantError.

Each runs after PRELUDE (tiny models) in a fresh copy of its names, in a temporary folder that is on sys.path
(as the current folder is for `python -m fxquant`); its last line makes the call named (the README's group) and
must raise. Order: by call, roughly in the order a user meets them.
"""

from dataclasses import dataclass


@dataclass(frozen=True)
class Example:
    """`code` run on PRELUDE's names; its last line makes the call `call` (the README group), which must raise.
    A last line `$ fxquant ...` runs that command line (the CLI's parser, then its command, in-process)."""

    call: str
    what: str
    code: str


E = Example

PRELUDE = '''
import torch, torch.nn.functional as F, fxquant
from torch import nn

class Net(nn.Module):  # conv-bn-relu, mean, linear: quantizes with every default
    def __init__(self):
        super().__init__()
        self.conv, self.bn, self.fc = nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.Linear(4, 2)
    def forward(self, x):
        return self.fc(F.relu(self.bn(self.conv(x))).mean((2, 3)))

class ConvThen(nn.Module):  # a quantized conv, then fn(y)
    def __init__(self, fn):
        super().__init__()
        self.conv, self.fn = nn.Conv2d(3, 4, 3, padding=1), fn
    def forward(self, x):
        return self.fn(self.conv(x))

class Two(nn.Module):  # two inputs
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
    def forward(self, a, b):
        return self.conv(a) + self.conv(b)

class Fork(nn.Module):  # two convs read x
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 4, 3, padding=1), nn.Conv2d(3, 4, 3, padding=1)
    def forward(self, x):
        return self.a(x) + self.b(x)

torch.manual_seed(0)
x = torch.randn(2, 3, 8, 8)
data = [torch.randn(2, 3, 8, 8) for _ in range(2)]   # calibration batches
labeled = [(b, torch.tensor([0, 1])) for b in data]  # (inputs, targets) batches
'''

Q = "q = fxquant.quantize(Net(), x, calib_data=data)"
INT8 = Q + "\nint8 = fxquant.convert(q)"
ONNX = INT8 + '\nfxquant.export_onnx(int8, "net.onnx")'

EXAMPLES = [
    # ------------------------------------------------------------------ options (QuantConfig, QuantSpec)
    E("fxquant.quantize", "model is not an nn.Module", "fxquant.quantize(lambda t: t * 2, x)"),
    E("fxquant.quantize", "config given as a dict", 'fxquant.quantize(Net(), x, {"w_bits": 4})'),
    E("fxquant.quantize", "a misspelt option", "fxquant.quantize(Net(), x, wbits=4)"),
    E("fxquant.quantize", "unknown backend", 'fxquant.quantize(Net(), x, backend="tflite")'),
    E("fxquant.quantize", "a flag that is not a bool", 'fxquant.quantize(Net(), x, qat="yes")'),
    E("fxquant.quantize", "unknown observer", 'fxquant.quantize(Net(), x, observer="max")'),
    E("fxquant.quantize", "exclude given as one string", 'fxquant.quantize(Net(), x, exclude="fc")'),
    E("fxquant.quantize", "exclude holding something else", "fxquant.quantize(Net(), x, exclude=[3])"),
    E("fxquant.quantize", "exclude naming no module", 'fxquant.quantize(Net(), x, exclude=["fcc"])'),
    E("fxquant.quantize", "leaf_modules naming no module", 'fxquant.quantize(Net(), x, leaf_modules=["head"])'),
    E("fxquant.quantize", "gptq not a bool", "fxquant.quantize(Net(), x, gptq='yes')"),
    E("fxquant.quantize", "SmoothQuant alpha outside (0, 1)", "fxquant.quantize(Net(), x, smooth=2)"),
    E("fxquant.quantize", "concrete_args not a dict", "fxquant.quantize(Net(), x, concrete_args=[1])"),
    E("fxquant.quantize", "bit width out of range", "fxquant.quantize(Net(), x, w_bits=16)"),
    E("fxquant.quantize", "layer_bits not a dict", 'fxquant.quantize(Net(), x, layer_bits=["fc", 4])'),
    E("fxquant.quantize", "layer_bits value not a pair", 'fxquant.quantize(Net(), x, layer_bits={"fc": 4})'),
    E("fxquant.quantize", "unknown deployment target", 'fxquant.quantize(Net(), x, target="avx512")'),
    E("fxquant.quantize", "reduce_range on a backend without it", 'fxquant.quantize(Net(), x, backend="tensorrt", reduce_range=True)'),
    E("fxquant.QuantSpec", "unknown dtype", 'fxquant.QuantSpec(dtype="int16", qmin=-32768, qmax=32767)'),
    E("fxquant.QuantSpec", "qmin/qmax outside the dtype", 'fxquant.QuantSpec(dtype="int8", qmin=-200, qmax=127)'),
    E("fxquant.QuantSpec", "symmetric on an unsigned range", 'fxquant.QuantSpec(dtype="uint8", qmin=0, qmax=255, symmetric=True)'),
    E("fxquant.QuantSpec", "negative channel axis", 'fxquant.QuantSpec(dtype="int8", qmin=-127, qmax=127, axis=-1)'),
    E("fxquant.QuantSpec", "unknown observer", 'fxquant.QuantSpec(dtype="int8", qmin=-128, qmax=127, observer="max")'),
    E("fxquant.QuantSpec", "unknown fake-quant kind", 'fxquant.QuantSpec(dtype="int8", qmin=-128, qmax=127, fake_quant="pact")'),
    E("fxquant.QuantSpec", "lsq+ on a symmetric spec",
      'fxquant.QuantSpec(dtype="int8", qmin=-127, qmax=127, symmetric=True, fake_quant="lsq+")'),
    E("fxquant.backends.Rule", "a backend row of unknown kind",
      'from fxquant.backends import Rule\nRule("my_relu", ((nn.ReLU,),), kind="int8")'),
    E("fxquant.nn.ConvAct2d", "unknown fused activation", 'fxquant.nn.ConvAct2d(3, 4, 3, act="gelu")'),
    # ------------------------------------------------------------------ quantize: inputs and tracing
    E("fxquant.quantize", "example_inputs not tensors", "fxquant.quantize(Net(), [])"),
    E("fxquant.quantize", "too many example inputs", "fxquant.quantize(Net(), (x, x))"),
    E("fxquant.quantize", "a keyword input the forward does not take", 'fxquant.quantize(Net(), {"y": x})'),
    E("fxquant.quantize", "keyword inputs missing one the forward needs", 'fxquant.quantize(Two(), {"a": x})'),
    E("fxquant.quantize", "example input of the wrong shape", "fxquant.quantize(Net(), torch.randn(2, 5, 8, 8))"),
    E("fxquant.quantize", "the model's own forward branches on a value",
      "fxquant.quantize(ConvThen(lambda y: y if y.sum() > 0 else -y), x)"),
    E("fxquant.quantize", "nothing to quantize (every layer excluded)", 'fxquant.quantize(Net(), x, exclude=["conv", "fc"])'),
    E("fxquant.quantize", "layer_bits names no quantized layer", 'fxquant.quantize(Net(), x, layer_bits={"conv2": (4, 4)})'),
    E("fxquant.quantize", "layer_bits reads one activation at two widths",
      'fxquant.quantize(Fork(), x, layer_bits={"a": (8, 4), "b": (8, 8)})'),
    E("fxquant.quantize", "SmoothQuant without calibration data", "fxquant.quantize(Net(), x, smooth=0.5)"),
    # ------------------------------------------------------------------ quantize / calibrate: data
    E("fxquant.quantize", "calib_data not iterable", "fxquant.quantize(Net(), calib_data=5)"),
    E("fxquant.quantize", "calib_data empty (no example inputs)", "fxquant.quantize(Net(), calib_data=[])"),
    E("fxquant.quantize", "a batch with fewer inputs than the forward takes", "fxquant.quantize(Two(), calib_data=[x])"),
    E("fxquant.quantize", "NaN in a calibration batch", 'fxquant.quantize(Net(), x, calib_data=[x * float("nan")])'),
    E("fxquant.quantize", "a weight that is NaN", 'net = Net()\nnet.conv.weight.data[0] = float("nan")\n'
                                                   "fxquant.quantize(net, x, calib_data=data)"),
    E("fxquant.quantize", "an additive -1e9 mask quantized with its input",
      "class Masked(nn.Module):\n    def __init__(self):\n        super().__init__()\n        self.fc = nn.Linear(8, 8)\n"
      "    def forward(self, x):\n        return self.fc(x + torch.triu(torch.full((8, 8), -1e9), 1))\n"
      "fxquant.quantize(Masked(), x, calib_data=data)"),
    E("fxquant.quantize", "a calibration batch the model cannot run", "fxquant.quantize(Net(), x, calib_data=[torch.randn(2, 5, 8, 8)])"),
    E("fxquant.quantize", "calibration batches that are not tensors", "fxquant.quantize(Net(), x, calib_data=[[1, 2]])"),
    E("fxquant.calibrate", "a float model", "fxquant.calibrate(Net(), data)"),
    E("fxquant.calibrate", "calib_data empty", "q = fxquant.quantize(Net(), x)\nfxquant.calibrate(q, [])"),
    E("fxquant.calibrate", "a dict batch without an input", 'q = fxquant.quantize(Two(), (x, x))\nfxquant.calibrate(q, [{"a": x}])'),
    E("fxquant.calibrate", "bias correction on a generator (read once)",
      "q = fxquant.quantize(Net(), x)\nfxquant.calibrate(q, (b for b in data), bias_correction=True)"),
    E("fxquant.calibrate", "gptq not a bool", "q = fxquant.quantize(Net(), x)\nfxquant.calibrate(q, data, gptq=1)"),
    E("fxquant.calibrate", "GPTQ on a generator (read once per layer)",
      "q = fxquant.quantize(Net(), x, gptq=True)\nfxquant.calibrate(q, (b for b in data))"),
    E("fxquant.bias_correction.correct_bias", "a float model",
      "import fxquant.bias_correction\nfxquant.bias_correction.correct_bias(Net(), data)"),
    E("fxquant.bias_correction.correct_bias", "an uncalibrated model",
      "import fxquant.bias_correction\nq = fxquant.quantize(Net(), x)\nfxquant.bias_correction.correct_bias(q, data)"),
    E("fxquant.bias_correction.correct_bias", "no calibration batch",
      "import fxquant.bias_correction\nq = fxquant.quantize(Net(), x, calib_data=data)\nfxquant.bias_correction.correct_bias(q, [])"),
    E("fxquant.gptq.gptq", "a float model", "from fxquant.gptq import gptq\ngptq(Net(), data)"),
    E("fxquant.gptq.gptq", "an uncalibrated model", "from fxquant.gptq import gptq\nq = fxquant.quantize(Net(), x)\ngptq(q, data)"),
    E("fxquant.gptq.gptq", "no calibration batch",
      "from fxquant.gptq import gptq\nq = fxquant.quantize(Net(), x, calib_data=data)\ngptq(q, [])"),
    # ------------------------------------------------------------------ quantize(model) with no inputs yet
    E("qmodel(...)", "first call with positional and keyword inputs", "qmodel = fxquant.quantize(Two())\nqmodel(x, b=x)"),
    E("qmodel.parameters", "an optimizer before the first call", "qmodel = fxquant.quantize(Net())\ntorch.optim.SGD(qmodel.parameters(), lr=0.1)"),
    E("qmodel.named_parameters", "named_parameters before the first call", "qmodel = fxquant.quantize(Net())\ndict(qmodel.named_parameters())"),
    E("qmodel.state_dict", "a checkpoint before the first call", "qmodel = fxquant.quantize(Net())\nqmodel.state_dict()"),
    E("qmodel.load_state_dict", "loading a checkpoint before the first call",
      "qmodel = fxquant.quantize(Net())\nqmodel.load_state_dict(Net().state_dict())"),
    E("fxquant.convert", "a model that has not run yet", "fxquant.convert(fxquant.quantize(Net()))"),
    E("fxquant.export_onnx", "a model that has not run yet", 'fxquant.export_onnx(fxquant.quantize(Net()), "net.onnx")'),
    E("fxquant.report", "a model that has not run yet", "fxquant.report(fxquant.quantize(Net()))"),
    E("fxquant.freeze_bn", "a model that has not run yet", "fxquant.freeze_bn(fxquant.quantize(Net(), qat=True))"),
    # ------------------------------------------------------------------ convert, report, QAT
    E("fxquant.convert", "a float model", "fxquant.convert(Net())"),
    E("fxquant.convert", "converting twice", INT8 + "\nfxquant.convert(int8)"),
    E("fxquant.convert", "never calibrated", "fxquant.convert(fxquant.quantize(Net(), x))"),
    E("fxquant.convert", "a GraphModule unpickled (annotations lost)",
      Q + "\nimport pickle\nfxquant.convert(pickle.loads(pickle.dumps(q)))"),
    E("fxquant.report", "a float model", "fxquant.report(Net())"),
    E("fxquant.freeze_bn", "a PTQ model (BatchNorm already folded)", "fxquant.freeze_bn(fxquant.quantize(Net(), x))"),
    E("fxquant.qat.QATSchedule", "a float model", "fxquant.qat.QATSchedule(Net())"),
    E("fxquant.qat.QATSchedule", "a negative step", "q = fxquant.quantize(Net(), x, qat=True)\nfxquant.qat.QATSchedule(q, freeze_observers_after=-1)"),
    E("fxquant.qat.train", "epochs=0", "q = fxquant.quantize(Net(), x, qat=True)\n"
                                       "fxquant.qat.train(q, labeled, optimizer=torch.optim.SGD(q.parameters(), lr=0.1), "
                                       "loss_fn=F.cross_entropy, epochs=0)"),
    E("fxquant.pipeline.run_passes", "your own pass fails",
      "gm = torch.fx.symbolic_trace(Net())\nfxquant.pipeline.run_passes(gm, [lambda gm: gm.no_such_attribute])"),
    E("fxquant.register_stand_in", "a class name instead of the class",
      'fxquant.register_stand_in("MultiheadAttention", lambda m: m)'),
    E("fxquant.register_stand_in", "make is not callable", 'fxquant.register_stand_in(nn.MultiheadAttention, "mine")'),
    # ------------------------------------------------------------------ export_onnx
    E("fxquant.export_onnx", "model is a path", 'fxquant.export_onnx("net.pt", "net.onnx", x)'),
    E("fxquant.export_onnx", "a float model without example inputs", 'fxquant.export_onnx(Net(), "net.onnx")'),
    E("fxquant.export_onnx", "opset out of range", INT8 + '\nfxquant.export_onnx(int8, "net.onnx", opset=11)'),
    E("fxquant.export_onnx", "path not a path", INT8 + "\nfxquant.export_onnx(int8, 123)"),
    E("fxquant.export_onnx", "output folder missing", INT8 + '\nfxquant.export_onnx(int8, "no/such/folder/net.onnx")'),
    E("fxquant.export_onnx", "simplify with external data", INT8 + '\nfxquant.export_onnx(int8, "net.onnx", simplify=True, external_data=True)'),
    E("fxquant.export_onnx", "a backend other than the one quantized for",
      Q + '\nfxquant.export_onnx(fxquant.convert(q), "net.onnx", backend="tensorrt")'),
    E("fxquant.export_onnx", "3-bit activations (no ONNX type)",
      'q = fxquant.quantize(Net(), x, calib_data=data, a_bits=3)\nfxquant.export_onnx(fxquant.convert(q), "net.onnx")'),
    E("fxquant.export_onnx", "4-bit activations below opset 21",
      'q = fxquant.quantize(Net(), x, calib_data=data, a_bits=4)\nfxquant.export_onnx(fxquant.convert(q), "net.onnx", opset=17)'),
    E("fxquant.export_onnx", "an output named like an input",
      'q = fxquant.quantize(ConvThen(lambda y: {"x": y}), x, calib_data=data)\nfxquant.export_onnx(fxquant.convert(q), "net.onnx")'),
    E("fxquant.export_onnx", "a model that fails one batch row larger",
      'q = fxquant.quantize(ConvThen(lambda y: y.view(2, 4, 64)), x, calib_data=data)\nfxquant.export_onnx(fxquant.convert(q), "net.onnx")'),
    E("fxquant.export_onnx", "a float op torch.onnx cannot export",
      'q = fxquant.quantize(ConvThen(lambda y: torch.mode(y, 1).values), x, calib_data=data)\n'
      'fxquant.export_onnx(fxquant.convert(q), "net.onnx")'),
    E("fxquant.export_onnx", "scaled_dot_product_attention with dropout",
      'q = fxquant.quantize(ConvThen(lambda y: F.scaled_dot_product_attention(y, y, y, dropout_p=0.1)), x, calib_data=data)\n'
      'fxquant.export_onnx(fxquant.convert(q), "net.onnx")'),
    E("fxquant.export_onnx", "add with alpha",
      'q = fxquant.quantize(ConvThen(lambda y: torch.add(y, y, alpha=2)), x, calib_data=data)\n'
      'fxquant.export_onnx(fxquant.convert(q), "net.onnx")'),
    E("fxquant.export_onnx", "MaxPool2d with return_indices",
      'q = fxquant.quantize(ConvThen(nn.MaxPool2d(2, return_indices=True)), x, calib_data=data)\n'
      'fxquant.export_onnx(fxquant.convert(q), "net.onnx")'),
    E("fxquant.export_onnx", "avg_pool2d with divisor_override",
      'q = fxquant.quantize(ConvThen(lambda y: F.avg_pool2d(y, 2, divisor_override=3)), x, calib_data=data)\n'
      'fxquant.export_onnx(fxquant.convert(q), "net.onnx")'),
    E("fxquant.export_onnx", "AvgPool2d with divisor_override",
      'q = fxquant.quantize(ConvThen(nn.AvgPool2d(2, divisor_override=3)), x, calib_data=data)\n'
      'fxquant.export_onnx(fxquant.convert(q), "net.onnx")'),
    E("fxquant.export_onnx", "interpolate in 'area' mode",
      'q = fxquant.quantize(ConvThen(lambda y: F.interpolate(y, scale_factor=0.5, mode="area")), x, calib_data=data)\n'
      'fxquant.export_onnx(fxquant.convert(q), "net.onnx")'),
    E("fxquant.export_onnx", "mean with a dtype",
      'q = fxquant.quantize(ConvThen(lambda y: y.mean(1, dtype=torch.float64)), x, calib_data=data)\n'
      'fxquant.export_onnx(fxquant.convert(q), "net.onnx")'),
    E("fxquant.export_onnx", "layer norm below opset 17",
      'q = fxquant.quantize(ConvThen(nn.LayerNorm(8)), x, calib_data=data)\nfxquant.export_onnx(fxquant.convert(q), "net.onnx", opset=13)'),
    E("fxquant.export_onnx", "einsum with 27 subscripts",
      'eq = "abcdefghijklmnopqrstuvwxyzA->A"\n'
      'q = fxquant.quantize(ConvThen(lambda y: torch.einsum(eq, y.reshape([1] * 26 + [-1]))), x, calib_data=data)\n'
      'fxquant.export_onnx(fxquant.convert(q), "net.onnx")'),
    E("fxquant.export_onnx", "a tensor attribute other than .shape read per batch",
      'q = fxquant.quantize(ConvThen(lambda y: y.mT), x, calib_data=data)\nfxquant.export_onnx(fxquant.convert(q), "net.onnx")'),
    E("fxquant.export_onnx", "a shape sliced at a bound computed in the graph",
      'q = fxquant.quantize(ConvThen(lambda y: y.view(y.shape[:y.dim() - 2] + (-1,))), x, calib_data=data)\n'
      'fxquant.export_onnx(fxquant.convert(q), "net.onnx")'),
    E("fxquant.export_onnx", "indexing with a Python list",
      'q = fxquant.quantize(ConvThen(lambda y: y[:, [0, 2]]), x, calib_data=data)\nfxquant.export_onnx(fxquant.convert(q), "net.onnx")'),
    E("fxquant.export_onnx", "Python lists of batch sizes joined (stochastic_depth called with training=True)",
      'import torchvision\nsd = lambda y: torchvision.ops.stochastic_depth(y, 0.2, "row", training=True)\n'
      'q = fxquant.quantize(ConvThen(sd), x, calib_data=data)\nfxquant.export_onnx(fxquant.convert(q), "net.onnx")'),
    E("fxquant.export_onnx", "StochasticDepth in a QAT model (traced in train mode)",
      'import torchvision\nq = fxquant.quantize(ConvThen(torchvision.ops.StochasticDepth(0.2, "row")), x, calib_data=data, qat=True)\n'
      'fxquant.export_onnx(fxquant.convert(q), "net.onnx")'),
    E("fxquant.export_onnx", "a module kept whole that fails on shapes alone (a branch on values)",
      "class Gate(nn.Module):\n    def forward(self, y):\n        return y if y.sum() > 0 else -y\n"
      'q = fxquant.quantize(ConvThen(Gate()), x, calib_data=data)\nfxquant.export_onnx(fxquant.convert(q), "net.onnx")'),
    E("fxquant.export_onnx", "a leaf module given the batch size as a Python number",
      "class Scale(nn.Module):\n    def forward(self, y, n):\n        return y / n\n"
      "class Rows(nn.Module):\n    def __init__(self):\n        super().__init__()\n"
      "        self.conv, self.scale = nn.Conv2d(3, 4, 3), Scale()\n"
      "    def forward(self, x):\n        y = self.conv(x)\n        return self.scale(y, y.shape[0])\n"
      'q = fxquant.quantize(Rows(), x, calib_data=data, leaf_modules=["scale"])\nfxquant.export_onnx(fxquant.convert(q), "net.onnx")'),
    # ------------------------------------------------------------------ check_onnx, compare
    E("fxquant.check_onnx", "no such file", 'fxquant.check_onnx("missing.onnx")'),
    E("fxquant.check_onnx", "a file fxquant did not write",
      'torch.onnx.export(Net().eval(), (x,), "plain.onnx", dynamo=False)\nfxquant.check_onnx("plain.onnx")'),
    E("fxquant.compare", "inputs not tensors", INT8 + "\nfxquant.compare(Net(), q, int8, None, [1, 2])"),
    E("fxquant.compare", "the fake-quant model passed as int8", INT8 + "\nfxquant.compare(Net(), q, q, None, x)"),
    E("fxquant.compare", "int8 passed as the fake-quant model", INT8 + "\nfxquant.compare(Net(), int8, int8, None, x)"),
    E("fxquant.compare", "no such ONNX file", INT8 + '\nfxquant.compare(Net(), q, int8, "missing.onnx", x)'),
    E("fxquant.compare", "unknown reference", INT8 + '\nfxquant.compare(Net(), q, int8, None, x, reference="float")'),
    E("fxquant.compare", "an ONNX file of another model",
      ONNX + '\nq2 = fxquant.quantize(Fork(), x, calib_data=data)\nfxquant.compare(Fork(), q2, fxquant.convert(q2), "net.onnx", x)'),
    E("fxquant.compare", "unknown emulated CPU", ONNX + '\nfxquant.compare(Net(), q, int8, "net.onnx", x, cpu="Skylake")'),
    E("fxquant.check.run_file", "an Arm CPU without the Arm64 Python it runs in",
      ONNX + '\nimport os\nos.environ["FXQUANT_AARCH64_ROOT"] = "no-arm-root-here"\nfxquant.check.run_file("net.onnx", x, cpu="neoverse-n1")'),
    E("fxquant.compare.improvement", "no models", "from fxquant.compare import improvement\nimprovement(Net(), {}, x)"),
    # ------------------------------------------------------------------ sensitivity, mixed precision
    E("fxquant.sensitivity", "data is one tensor", "fxquant.sensitivity(Net(), x)"),
    E("fxquant.sensitivity", "batches without targets", "fxquant.sensitivity(Net(), data)"),
    E("fxquant.sensitivity", "inputs not tensors", "fxquant.sensitivity(Net(), [([1, 2], torch.tensor([0, 1]))])"),
    E("fxquant.sensitivity", "targets None", "fxquant.sensitivity(Net(), [(x, None)])"),
    E("fxquant.sensitivity", "no batches", "fxquant.sensitivity(Net(), [])"),
    E("fxquant.sensitivity", "metric given by name", 'fxquant.sensitivity(Net(), labeled, metric="top1")'),
    E("fxquant.mixed_precision", "metric given by name", 'fxquant.mixed_precision(Net(), labeled, avg_bits=4, metric="accuracy")'),
    E("fxquant.sensitivity", "a metric that returns NaN", 'fxquant.sensitivity(Net(), labeled, metric=lambda out, y: float("nan"))'),
    E("fxquant.sensitivity", "no quantizable layer (only an add)", 'fxquant.sensitivity(ConvThen(lambda y: y + y), labeled, exclude=["conv"])'),
    E("fxquant.mixed_precision", "no budget", "fxquant.mixed_precision(Net(), labeled)"),
    E("fxquant.mixed_precision", "a budget no choice of widths meets",
      "fxquant.mixed_precision(Net(), labeled, avg_bits=3, bits=(4, 8), allow_float=False)"),
    # ------------------------------------------------------------------ viz
    E("fxquant.viz", "config given as a dict", 'fxquant.viz(Net(), x, "net.html", config={"w_bits": 4})'),
    E("fxquant.viz", "unknown stage", 'fxquant.viz(Net(), x, "net.html", stages=["quantized"])'),
    E("fxquant.viz", "sqnr for an ONNX file", ONNX + '\nfxquant.viz("net.onnx", output="net.html", sqnr=True)'),
    E("fxquant.viz", "model of another type", 'fxquant.viz(42, x, "net.html")'),
    E("fxquant.viz", "model_explorer without an overlay", 'fxquant.viz(Net(), x, "net.html", model_explorer="me.json")'),
    E("fxquant.viz", "no example inputs", 'fxquant.viz(Net(), output="net.html")'),
    E("fxquant.viz", "example inputs not tensors", 'fxquant.viz(Net(), [1, 2], "net.html")'),
    E("fxquant.viz", "dot_stage not drawn", 'fxquant.viz(Net(), x, "net.html", dot="net.dot", dot_stage="onnx", stages=["traced"])'),
    E("fxquant.viz", "SVG asked for on a machine without Graphviz",
      'import os\nos.environ["PATH"] = ""  # no `dot` program\nfxquant.viz(Net(), x, "net.html", svg="net.svg")'),
    E("fxquant.viz", "output folder missing", 'fxquant.viz(Net(), x, "no/such/folder/net.html")'),
    E("fxquant.viz", "overlay file missing", 'fxquant.viz(Net(), x, "net.html", overlay="missing.json")'),
    E("fxquant.viz", "overlay file not JSON", 'open("o.json", "w").write("conv: 1")\nfxquant.viz(Net(), x, "net.html", overlay="o.json")'),
    E("fxquant.viz", "overlay not an object", 'fxquant.viz(Net(), x, "net.html", overlay=[[1, 2]])'),
    E("fxquant.viz", "overlay_better unknown", 'fxquant.viz(Net(), x, "net.html", overlay={"conv": 1.0}, overlay_better="best")'),
    E("fxquant.viz", "an overlay value not a number", 'fxquant.viz(Net(), x, "net.html", overlay={"conv": "high"})'),
    E("fxquant.viz", "an empty overlay", 'fxquant.viz(Net(), x, "net.html", overlay={})'),
    E("fxquant.viz", "ONNX file missing", 'fxquant.viz("missing.onnx", output="net.html")'),
    E("fxquant.viz", "ONNX file corrupt", 'open("bad.onnx", "wb").write(b"not protobuf")\nfxquant.viz("bad.onnx", output="net.html")'),
    E("fxquant.viz", "ONNX file without nodes", 'open("empty.onnx", "wb").write(b"")\nfxquant.viz("empty.onnx", output="net.html")'),
    E("fxquant.viz", "ONNX file invalid",
      'import onnx\ng = onnx.helper.make_graph([onnx.helper.make_node("NoSuchOp", ["a"], ["b"])], "g", [], [])\n'
      'onnx.save(onnx.helper.make_model(g), "invalid.onnx")\nfxquant.viz("invalid.onnx", output="net.html")'),
    E("fxquant viz", "MODEL without :attr", "$ fxquant viz mymodel.py"),
    E("fxquant viz", "no such .py file", "$ fxquant viz mymodel.py:Net"),
    E("fxquant viz", "the .py file fails to import", 'open("broken.py", "w").write("import no_such_package")\n$ fxquant viz broken.py:Net'),
    E("fxquant viz", "no such package", "$ fxquant viz no_such_package:Net"),
    E("fxquant viz", "no such attribute", "$ fxquant viz torchvision.models:resnet0"),
    E("fxquant viz", "building the model fails", "$ fxquant viz torchvision.models:ResNet"),
    E("fxquant viz", "attr is not a model", "$ fxquant viz torch:pi"),
    E("fxquant viz", "a bad --input-shape", "$ fxquant viz torchvision.models:resnet18 --input-shape 1,3,a"),
    E("fxquant viz", "--input-shape the model cannot run", "$ fxquant viz torchvision.models:resnet18 --input-shape 1,2,32,32"),
    # ------------------------------------------------------------------ the analysis CLI, the demo
    E("fxquant sensitivity", "--model without :FUNCTION", "$ fxquant sensitivity --model mymodels --data mymodels:data"),
    E("fxquant sensitivity", "--model cannot be imported", "$ fxquant sensitivity --model no_such_package:build --data no_such_package:data"),
    E("fxquant compare", "--model returns something else",
      'open("notamodel.py", "w").write("def build(): return \'resnet\'\\ndef data(): return []")\n'
      "$ fxquant compare --model notamodel:build --data notamodel:data"),
    E("fxquant.demo.run_demo", "epochs=0", "fxquant.demo.run_demo(epochs=0)"),
]
