"""The simulation engine: fake quantization inserted into any registered model, functional calls included.

A model is not rewritten. `QuantizedModel` runs it under a `TorchFunctionMode` that sees every call of the
quantizable ops (whether a module or the model's own forward makes it) and knows which module made it, from
global module hooks. Each call is a *site* named `<module path>:<op><k>` (the k-th such op in one call of that
module), e.g. `blocks.0.attn:matmul0` (q k^T) and `blocks.0.attn:matmul1` (attn v). Roles per op:

    linear, conv       a (input activation), w (weight)
    matmul             a, b (the two activations: QK^T and attn.V, head-wise on 4-D operands)
    softmax, gelu      out (their output, which feeds the next op: that op's input is then not re-quantized)
    norm               a (LayerNorm / GroupNorm input)

timm's fused attention (`F.scaled_dot_product_attention`) is decomposed in place into q k^T, softmax and
attn v, so the two attention matmuls and the softmax get their quantizers whatever the model's settings.

Example:
    >>> sites = discover(model, example)           # one float forward
    >>> qm = QuantizedModel(model, sites, quantizers)
    >>> qm(x)                                      # fake-quantized forward
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules import module as nn_module
from torch.overrides import TorchFunctionMode

from compress.errors import CompressError

from .quantizers import Quantizer, make

OPS = {
    F.linear: "linear", F.conv2d: "conv", F.conv1d: "conv",
    torch.matmul: "matmul", torch.Tensor.__matmul__: "matmul", torch.Tensor.matmul: "matmul", torch.bmm: "matmul",
    torch._C.TensorBase.matmul: "matmul",
    F.softmax: "softmax", torch.softmax: "softmax", torch.Tensor.softmax: "softmax",
    F.gelu: "gelu", F.layer_norm: "norm", F.group_norm: "norm",
    F.scaled_dot_product_attention: "sdpa",
}
# ops that compute with weights or activations but have no quantizer here: they run in float, and say so
UNSUPPORTED = {F.conv_transpose1d: "conv_transpose1d", F.conv_transpose2d: "conv_transpose2d",
               F.conv3d: "conv3d", torch.baddbmm: "baddbmm", torch.addmm: "addmm", torch.einsum: "einsum",
               F.embedding: "embedding", F.bilinear: "bilinear"}
ROLES = {"linear": ("a", "w"), "conv": ("a", "w"), "matmul": ("a", "b"), "softmax": ("out",), "gelu": ("out",),
         "norm": ("a",)}
_QUANTIZED = "_compress_quantized"  # attribute set on an output that a softmax / GELU quantizer produced


@dataclass
class Site:
    """One quantizable call: its name, op, owning module, the roles it quantizes and their tensor shapes."""
    name: str
    op: str
    module: str
    roles: list[str]
    shapes: dict[str, list[int]] = field(default_factory=dict)
    groups: int = 1          # conv groups (depthwise convs get channel-wise activations in Q-HyViT)
    reason: str = ""         # why a site without quantizers stays float
    after_norm: str = ""     # the norm module whose output this site's input is (RepQ-ViT reparameterisation)
    out_numel: int = 0       # its output's size on one image (discovery), for the memory of its record

    def key(self, role: str) -> str:
        return f"{self.name.replace('.', '/')}/{role}"

    def inside(self, block: str) -> bool:
        """Whether this site's module is `block` or lies within it."""
        return self.module == block or self.module.startswith(block + ".")

    def record_bytes(self, images: int) -> int:
        """What its calibration record holds over `images` (inputs but the weight, output and output gradient,
        float32), from the shapes seen on one image at discovery."""
        inputs = sum(math.prod(shape) for role, shape in self.shapes.items() if role != "w")
        return 4 * images * (inputs + 2 * self.out_numel)

    def weight_of(self, model: nn.Module) -> nn.Parameter | None:
        """The weight this site reads (linear / conv sites of a module with `.weight`)."""
        mod = model.get_submodule(self.module) if self.module else model
        return getattr(mod, "weight", None) if self.op in ("linear", "conv") else None


@dataclass
class Record:
    """What one site saw on the calibration batch: its inputs per role, extra args, output and output grad."""
    inputs: dict[str, torch.Tensor]
    extra: tuple
    out: torch.Tensor
    grad: torch.Tensor | None = None

    def halves(self, site: Site | None = None) -> tuple[Record, Record] | None:
        """The record split into two halves of the calibration batch (activations are batch-major, also
        where the batch is merged with windows or patches), or None when it cannot be split. With `site`:
        inputs whose leading size did not grow with the batch (`site.shapes`, seen at discovery on one image:
        a constant matrix that happens to have as many rows as the batch) stay whole, and the op must give
        the first half's output from the first half's inputs (CSATv2's last stage attends across the batch:
        its records cannot be split)."""
        n = self.out.shape[0] if self.out.ndim else 0
        fixed = {r for r, t in self.inputs.items() if r == "w" or (
            site is not None and t.ndim and site.shapes.get(r, [None])[0] == t.shape[0])}
        if n < 2 or n % 2 or any(t.shape[0] != n for r, t in self.inputs.items() if r not in fixed):
            return None
        h = n // 2

        def part(sl):
            return Record({r: t if r in fixed else t[sl] for r, t in self.inputs.items()}, self.extra,
                          self.out[sl], None if self.grad is None else self.grad[sl])

        first = part(slice(0, h))
        if site is not None:  # the op must treat samples independently (CSATv2 attends across the batch)
            try:
                with torch.no_grad():
                    again = run_op(site, first.inputs, first.extra, {})
            except RuntimeError:
                return None
            tol = 1e-4 * float(first.out.abs().max()) + 1e-6
            if again.shape != first.out.shape or float((again - first.out).abs().max()) > tol:
                return None
        return first, part(slice(h, n))


def run_op(site: Site, inputs: dict[str, torch.Tensor], extra: tuple, quant: dict[str, nn.Module]) -> torch.Tensor:
    """Re-run one site's op on recorded inputs with the given quantizers (missing roles stay float)."""
    q = {r: quant.get(r, nn.Identity()) for r in ("a", "b", "w", "out")}
    if site.op == "linear":
        return F.linear(q["a"](inputs["a"]), q["w"](inputs["w"]), *extra)
    if site.op == "conv":
        conv = F.conv2d if inputs["a"].ndim == 4 else F.conv1d
        return conv(q["a"](inputs["a"]), q["w"](inputs["w"]), *extra)
    if site.op == "matmul":
        return torch.matmul(q["a"](inputs["a"]), q["b"](inputs["b"]))
    if site.op == "norm":
        norm = F.layer_norm if extra[0] == "layer" else F.group_norm
        return norm(q["a"](inputs["a"]), *extra[1:])
    return q["out"](inputs["out"])


class _Intercept(TorchFunctionMode):
    """Names each quantizable call and applies (or records) its quantizers."""

    def __init__(self, owner: QuantizedModel | None, names: dict[int, str], sites: dict[str, Site] | None = None):
        super().__init__()
        self.owner, self.names = owner, names
        self.stack: list[list] = [["", {}]]
        self.found = sites  # discovery mode when not None
        self.norm_outputs: dict[int, str] = {}

    def push(self, module, args):
        name = self.names.get(id(module))
        if name is not None:
            self.stack.append([name, {}])

    def pop(self, module, args, output):
        if self.names.get(id(module)) is not None and len(self.stack) > 1:
            self.stack.pop()

    def site_name(self, op: str) -> tuple[str, str]:
        module, counts = self.stack[-1]
        k = counts.get(op, 0)
        counts[op] = k + 1
        return f"{module}:{op}{k}", module

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        op = OPS.get(func)
        if op is None:
            if self.found is not None and func in UNSUPPORTED:
                name, module = self.site_name(UNSUPPORTED[func])
                self.found[name] = Site(name, "float", module, [], reason=f"{UNSUPPORTED[func]} has no quantizer")
            return func(*args, **kwargs)
        if op == "sdpa":
            return self.attention(*args, **kwargs)
        if op == "softmax" and len(args) < 2 and "dim" not in kwargs:
            return func(*args, **kwargs)
        name, module = self.site_name(op)
        inputs, extra = _split(op, func, args, kwargs)
        if self.found is not None:
            return self.discover(name, module, op, func, inputs, extra, args, kwargs)
        return self.owner.apply_site(name, op, func, inputs, extra, args, kwargs)

    def discover(self, name, module, op, func, inputs, extra, args, kwargs):
        out = func(*args, **kwargs)
        roles = [r for r in ROLES[op] if r == "out" or r == "w" or not getattr(inputs[r], _QUANTIZED, False)]
        site = self.found.get(name) or Site(name, op, module, roles)
        site.shapes = {r: list((inputs.get(r) if r != "out" else out).shape) for r in roles}
        site.out_numel = out.numel()
        if op == "conv":
            site.groups = int(extra[-1])
        if op in ("linear", "conv"):
            norm, tensor = self.norm_outputs.get(id(inputs["a"]), ("", None))
            site.after_norm = norm if tensor is inputs["a"] else ""
        self.found[name] = site
        if op in ("softmax", "gelu"):
            setattr(out, _QUANTIZED, True)
        if op == "norm" and extra[0] == "layer":
            self.norm_outputs[id(out)] = (module, out)  # the tensor is kept so its id cannot be reused
        return out

    def attention(self, q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
        """F.scaled_dot_product_attention written out, so its matmuls and softmax are sites like any other."""
        # the mode is off inside its own handler: route the parts back through it explicitly
        call = self.__torch_function__
        scale = scale if scale is not None else 1.0 / math.sqrt(q.shape[-1])
        attn = call(torch.matmul, (), (q * scale, k.transpose(-2, -1)))
        if is_causal:
            n, m = q.shape[-2], k.shape[-2]
            attn = attn.masked_fill(torch.ones(n, m, dtype=torch.bool, device=attn.device).tril().logical_not(), float("-inf"))
        if attn_mask is not None:
            attn = attn.masked_fill(attn_mask.logical_not(), float("-inf")) if attn_mask.dtype == torch.bool \
                else attn + attn_mask
        return call(torch.matmul, (), (call(torch.softmax, (), (attn,), {"dim": -1}), v))


def _split(op: str, func, args: tuple, kwargs: dict) -> tuple[dict, tuple]:
    """The quantizable tensors of a call by role, and the rest of its arguments."""
    if op in ("linear", "conv"):
        names = ("input", "weight", "bias", "stride", "padding", "dilation", "groups")
        full = {**dict(zip(names, args)), **kwargs}
        rest = (full.get("bias"),)
        if op == "conv":
            rest += (full.get("stride", 1), full.get("padding", 0), full.get("dilation", 1), full.get("groups", 1))
        return {"a": full["input"], "w": full["weight"]}, rest
    if op == "matmul":
        return {"a": args[0], "b": args[1]}, ()
    if op == "norm":
        if func is F.layer_norm:
            names = ("input", "normalized_shape", "weight", "bias", "eps")
            full = {**dict(zip(names, args)), **kwargs}
            return {"a": full["input"]}, ("layer", full["normalized_shape"], full.get("weight"), full.get("bias"),
                                          full.get("eps", 1e-5))
        names = ("input", "num_groups", "weight", "bias", "eps")
        full = {**dict(zip(names, args)), **kwargs}
        return {"a": full["input"]}, ("group", full["num_groups"], full.get("weight"), full.get("bias"),
                                      full.get("eps", 1e-5))
    return {}, ()


def _module_names(model: nn.Module) -> dict[int, str]:
    return {id(m): n for n, m in model.named_modules()}


class _Hooked:
    """Global module hooks feeding the interceptor's module stack, only while the context is open."""

    def __init__(self, mode: _Intercept):
        self.mode = mode

    def __enter__(self):
        self.handles = [nn_module.register_module_forward_pre_hook(self.mode.push),
                        nn_module.register_module_forward_hook(self.mode.pop)]
        self.mode.__enter__()
        return self.mode

    def __exit__(self, *exc):
        self.mode.__exit__(*exc)
        for h in self.handles:
            h.remove()


def discover(model: nn.Module, example: torch.Tensor) -> list[Site]:
    """The quantizable sites of `model`, in execution order, from one float forward on `example`.

    Example:
        >>> [s.name for s in discover(create_model("vit"), torch.randn(1, 3, 32, 32))][:3]
        ['patch_embed.proj:conv0', 'blocks.0.norm1:norm0', 'blocks.0.attn.qkv:linear0']

    Calls of ops with no quantizer (transposed convs, einsum, ...) come back as sites of op `float` with a
    `reason`, so the report can name them.
    """
    found: dict[str, Site] = {}
    was = model.training
    model.eval()
    try:
        with torch.no_grad(), _Hooked(_Intercept(None, _module_names(model), found)):
            model(example)
    except (RuntimeError, AssertionError, ValueError) as e:
        raise CompressError("the calibration images do not fit the model",
                            expected="images of the model's input size",
                            found=f"shape {tuple(example.shape)}: {str(e).splitlines()[0][:160]}") from e
    finally:
        model.train(was)
    return list(found.values())


class QuantizedModel(nn.Module):
    """A model run with fake quantizers at its sites. `quantizers` maps `site.key(role)` to a Quantizer; an
    uncalibrated quantizer, or one whose site is outside `active` (when set), passes values through.

    `record(sites)` collects what those sites see (inputs, output, output gradient) for calibration."""

    def __init__(self, model: nn.Module, sites: list[Site], quantizers: dict[str, Quantizer] | None = None):
        super().__init__()
        self.model = model
        self.sites = {s.name: s for s in sites}
        self.quantizers = nn.ModuleDict(quantizers or {})
        self.active: set[str] | None = None
        self.recording: dict[str, Record] | None = None  # set by record(): what `recording_sites` saw
        self.recording_sites: set[str] = set()
        self.floating = False

    def site_quantizers(self, site: Site) -> dict[str, Quantizer]:
        return {r: self.quantizers[site.key(r)] for r in site.roles if site.key(r) in self.quantizers}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.run(self.model, x)

    def run(self, module: nn.Module, *args, **kwargs) -> torch.Tensor:
        """Call `module` (the model or one of its submodules) with this model's site names and quantizers."""
        with _Hooked(_Intercept(self, _module_names(self.model))):
            return module(*args, **kwargs)

    def apply_site(self, name, op, func, inputs, extra, args, kwargs):
        site = self.sites.get(name)
        on = site is not None and not self.floating and (self.active is None or name in self.active)
        quant = self.site_quantizers(site) if on else {}
        recording = self.recording is not None and name in self.recording_sites
        if not quant and not recording:
            return func(*args, **kwargs)
        if op in ("softmax", "gelu"):  # quantized at the output: the float output is the op's own
            inputs = {"out": func(*args, **kwargs)}
            out = inputs["out"]
        else:
            out = run_op(site, inputs, extra, {}) if recording else None
        if recording:
            # the inputs are what this site receives from upstream (quantized there if active). The record
            # holds copies, and the model goes on with its own copy of the output: a model that then writes
            # into either in place (naflexvit adds its position embedding with `x.add_`) must not change
            # what the site is calibrated against.
            if out.requires_grad:
                out.retain_grad()
            self.recording[name] = Record({r: t.detach() if r == "w" else t.detach().clone()
                                           for r, t in inputs.items()}, extra, out)
            return run_op(site, inputs, extra, quant) if quant else out.clone()
        return run_op(site, inputs, extra, quant) if quant else out

    def record(self, x: torch.Tensor, sites: list[str], grad_loss=None) -> dict[str, Record]:
        """Inputs and outputs of `sites` on `x`; with `grad_loss(logits)`, also d loss / d output per site."""
        self.recording, self.recording_sites = {}, set(sites)
        try:
            with torch.set_grad_enabled(grad_loss is not None):
                logits = self(x)
                if grad_loss is not None:
                    grad_loss(logits).backward()
            recs = self.recording
        finally:
            self.recording = None
            self.model.zero_grad(set_to_none=True)
        for r in recs.values():
            r.grad = r.out.grad.detach() if r.out.grad is not None else None
            r.out = r.out.detach()
        return recs

    def specs(self) -> dict:
        """JSON description of every quantizer (the checkpoint's structure op)."""
        return {k: q.spec() for k, q in self.quantizers.items()}


def sites_to_json(sites: list[Site]) -> list[dict]:
    return [{"name": s.name, "op": s.op, "module": s.module, "roles": s.roles, "groups": s.groups,
             "after_norm": s.after_norm} for s in sites]


def replay(model: nn.Module, op: dict, input_size: int, in_chans: int) -> QuantizedModel:
    """The `quantize` structure op, registered with the core (pyproject's `compress.structure_ops`)."""
    return rebuild(model, op)


def rebuild(model: nn.Module, op: dict) -> QuantizedModel:
    """A QuantizedModel from a checkpoint's `quantize` structure op (weights and scales load afterwards)."""
    sites = [Site(d["name"], d["op"], d["module"], d["roles"], groups=d["groups"], after_norm=d["after_norm"])
             for d in op["sites"]]
    return QuantizedModel(model, sites, {k: make(spec) for k, spec in op["quantizers"].items()})
