"""The forward-path engine: adapters applied on a layer in its forward pass, from their factors; weights untouched.

`ForwardEngine(root, path_of).reconcile(plan)` makes every planned layer of `root` compute
y = L·(W·(R·x)) + Σ Δx in the order of the plan (exactly what the merged weight would compute), where W is whatever
the layer's own forward uses (fp8, fp8 scaled, GGUF, bnb 4-bit or plain floats: the host's code runs the base).
Strengths are plain numbers (`set_strengths` costs no tensor work, except DoRA norms after a changed op on the same
layer); a switch builds only the small factor forms (`algorithms/forms.py`). `restore()` puts each layer's forward
back; the stored weight is never written.

What moves with the model: each patched layer's forms live in a small `AdapterState` module registered on the
layer (or, when the layer's `_apply` does not recurse — Forge's GGUF/bnb Linear — on its nearest plain ancestor), so
`model.to(device)` moves them; a forward on another device (a partial low-VRAM load) moves them per call.
"""

from __future__ import annotations

import sys
import types
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from .algorithms.base import DeltaPatch
from .algorithms.dora import column_norm
from .algorithms.forms import ADDITIVE, BlockRotation, Butterfly, DoRAForm, Geometry, GLoRAForm, Replacement, Scale
from .errors import AdapterError
from .patching import Operation, Plan, compute

FLOAT8 = tuple(getattr(torch, n) for n in ("float8_e4m3fn", "float8_e5m2", "float8_e4m3fnuz", "float8_e5m2fnuz")
               if hasattr(torch, n))
PLAIN = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
STATE_NAME = "lib_adapters"


# ---- storage: what a layer's weight is, its real shape, and its values --------------------------------------------

@dataclass(frozen=True)
class Storage:
    """How a parameter is stored: `kind` ("float", "fp8", "fp8 scaled", "gguf Q4_K", "bnb nf4", or "unknown …")."""

    kind: str
    shape: tuple[int, ...]

    @property
    def quantized(self) -> bool:
        return self.kind != "float"

    @property
    def known(self) -> bool:
        return not self.kind.startswith("unknown")


def storage_of(module: nn.Module, attr: str = "weight") -> Storage:
    """The storage of `module.<attr>`: real shapes from GGUF `real_shape`, bnb `quant_state.shape`, or the tensor."""
    t = getattr(module, attr)
    scaled = attr == "weight" and getattr(module, "scale_weight", None) is not None
    gguf = getattr(t, "gguf_cls", None)
    if gguf is not None:
        qtype = getattr(gguf, "qtype", None)
        label = getattr(qtype, "name", None) or getattr(gguf, "__name__", None) or str(gguf)
        return Storage(f"gguf {label}", tuple(getattr(t, "real_shape", t.shape)))
    state = getattr(t, "quant_state", None)
    if state is not None and hasattr(state, "shape"):
        return Storage(f"bnb {getattr(t, 'quant_type', getattr(state, 'quant_type', '4bit'))}", tuple(state.shape))
    if t.dtype in FLOAT8:
        return Storage("fp8 scaled" if scaled else "fp8", tuple(t.shape))
    if t.dtype in PLAIN:
        return Storage("float scaled" if scaled else "float", tuple(getattr(t, "real_shape", t.shape)))
    return Storage(f"unknown {t.dtype} {type(t).__name__}", tuple(t.shape))


def dequantized(module: nn.Module, attr: str, dtype: torch.dtype, host: Callable | None = None) -> Tensor:
    """`module.<attr>` as the layer computes with it, in `dtype`: GGUF/bnb dequantized (GGUF through its class,
    bnb through the host's function), fp8 cast and multiplied by `scale_weight` where the layer has one."""
    t = getattr(module, attr)
    if getattr(t, "gguf_cls", None) is not None:
        if getattr(t, "baked", True) is False:  # Forge bakes at model load anyway (bake_gguf_model): same layout step
            t.gguf_cls.bake(t)
        w = t.gguf_cls.dequantize_pytorch(t)
    elif getattr(t, "quant_state", None) is not None:
        if host is None:
            raise AdapterError(None, f"{type(module).__name__} ({storage_of(module, attr).kind}) cannot be read here")
        w = host(t)
    else:
        w = t.detach()
    w = w.to(dtype).reshape(storage_of(module, attr).shape)
    scale = getattr(module, "scale_weight", None) if attr == "weight" else None
    if scale is not None:
        w = w * scale.to(device=w.device, dtype=dtype)
    return w


def geometry_of(module: nn.Module, shape: tuple[int, ...]) -> Geometry | None:
    """Linear (2-D weight, F.linear) or Conv2d (groups 1, zero padding); None for any other layer."""
    if isinstance(module, nn.Conv2d):
        if module.groups != 1 or module.padding_mode != "zeros" or len(shape) != 4:
            return None
        return Geometry(True, tuple(module.stride), module.padding, tuple(module.dilation))
    if isinstance(module, (nn.Embedding, nn.modules.conv._ConvNd, nn.LayerNorm, nn.GroupNorm)) or len(shape) != 2:
        return None
    if isinstance(module, nn.Linear) or "Linear" in type(module).__name__:
        return Geometry()
    return None


# ---- one layer's state -----------------------------------------------------------------------------------------------

@dataclass
class Term:
    """One operation on one layer: its form, strength, output-row index, input-column block, bias delta."""

    op: Operation
    form: object
    strength: float
    rows: object = None               # slice or LongTensor into the output rows, None = all
    cols: tuple[int, int] | None = None
    bias: Tensor | None = None        # Δb (rows of the block, adapter order)

    @property
    def left(self) -> bool:
        return isinstance(self.form, (BlockRotation, Butterfly, Replacement)) \
            or (isinstance(self.form, Scale) and not self.form.on_input) \
            or (isinstance(self.form, DoRAForm) and self.form.on_output)

    @property
    def right(self) -> bool:
        return (isinstance(self.form, Scale) and self.form.on_input) or isinstance(self.form, GLoRAForm) \
            or (isinstance(self.form, DoRAForm) and not self.form.on_output)


def _map(value, fn):
    if isinstance(value, Tensor):
        return fn(value)
    if hasattr(value, "map_tensors"):
        return value.map_tensors(fn)
    return value


class AdapterState(nn.Module):
    """The terms of one patched layer; no parameters or buffers (state dicts unchanged), but `.to()` moves them."""

    def __init__(self, terms: list[Term], geometry: Geometry, base_bias: Callable[[], Tensor | None]):
        super().__init__()
        self.terms = terms
        self.geometry = geometry
        self.base_bias = base_bias
        self.previous_forward = None

    def _apply(self, fn, recurse=True):
        for t in self.terms:
            t.form = _map(t.form, fn)
            t.bias = _map(t.bias, fn)
            if isinstance(t.rows, Tensor):
                t.rows = fn(t.rows)
        return self

    def nbytes(self) -> int:
        return sum(t.form.nbytes() + (t.bias.numel() * t.bias.element_size() if t.bias is not None else 0)
                   for t in self.terms)

    def run(self, layer: nn.Module, x: Tensor, args, kwargs) -> Tensor:
        terms = [t for t in self.terms if t.strength != 0]
        g = self.geometry
        probe = next((t.form for t in terms), None)
        if probe is not None:
            sample = _first_tensor(probe)
            if sample is not None and sample.device != x.device:  # a partial (low-VRAM) load: move per call
                terms = [Term(t.op, _map(t.form, lambda v: v.to(x.device)), t.strength, _on(t.rows, x.device), t.cols,
                              _map(t.bias, lambda v: v.to(x.device))) for t in terms]
        inputs = [x] * (len(terms) + 1)                   # inputs[k]: what term k (and inputs[0]: the base) sees
        if any(t.right for t in terms):
            for k in range(len(terms) - 1, -1, -1):
                inputs[k] = _right(terms[k], inputs[k + 1], g) if terms[k].right else inputs[k + 1]
        original = self.previous_forward or types.MethodType(type(layer).forward, layer)
        y = original(inputs[0], *args, **kwargs)
        if not terms:
            return y
        acc = y.movedim(1, -1) if g.conv else y
        shifted = any(t.left for t in terms)
        bias = self.base_bias() if shifted else None
        if bias is not None:
            acc = acc - bias.to(device=acc.device, dtype=acc.dtype)
        else:
            acc = acc.clone() if acc is y else acc.contiguous()
        for k, t in enumerate(terms):
            _apply_term(t, acc, inputs[k + 1], g)
        for t in terms:
            if t.bias is not None:
                _add_rows(acc, t.rows, t.strength * t.bias.to(acc.dtype))
        if bias is not None:
            acc = acc + bias.to(device=acc.device, dtype=acc.dtype)
        return acc.movedim(-1, 1) if g.conv else acc


def _first_tensor(form):
    for v in vars(form).values():
        if isinstance(v, Tensor):
            return v
        if hasattr(v, "map_tensors"):
            inner = _first_tensor(v)
            if inner is not None:
                return inner
    return None


def _on(rows, device):
    return rows.to(device) if isinstance(rows, Tensor) else rows


def _rows(acc: Tensor, rows) -> Tensor:
    return acc if rows is None else acc[..., rows]


def _set_rows(acc: Tensor, rows, value: Tensor) -> None:
    if rows is None:
        acc.copy_(value)
    else:
        acc[..., rows] = value


def _add_rows(acc: Tensor, rows, value: Tensor) -> None:
    if rows is None:
        acc.add_(value)
    elif isinstance(rows, slice):
        acc[..., rows].add_(value)
    else:
        acc.index_add_(acc.ndim - 1, rows, value)


def _block_in(x: Tensor, cols, g: Geometry) -> Tensor:
    if cols is None:
        return x
    return x[:, cols[0]:cols[1]] if g.conv else x[..., cols[0]:cols[1]]


def _additive(form, x: Tensor, g: Geometry, dtype) -> Tensor:
    """Δx of an additive form, rows last, in `dtype`."""
    fdtype = _first_tensor(form).dtype
    z = form.add(x.to(fdtype), g)
    return (z.movedim(1, -1) if g.conv else z).to(dtype)


def _right(t: Term, x: Tensor, g: Geometry) -> Tensor:
    """The input seen by every earlier op once op `t`'s column transform is applied."""
    s, form = t.strength, t.form
    xb = _block_in(x, t.cols, g)
    xl = xb.movedim(1, -1) if g.conv else xb
    if isinstance(form, GLoRAForm):
        out = form.mix.right(xl.to(form.mix.a.dtype), s).to(x.dtype)
    elif isinstance(form, DoRAForm):
        out = xl * (1 + s * (form.factor() - 1)).to(xl.dtype)
    else:
        out = form.right(xl, s)
    out = out.movedim(-1, 1) if g.conv else out
    if t.cols is None:
        return out
    x = x.clone()
    if g.conv:
        x[:, t.cols[0]:t.cols[1]] = out
    else:
        x[..., t.cols[0]:t.cols[1]] = out
    return x


def _apply_term(t: Term, acc: Tensor, x: Tensor, g: Geometry) -> None:
    """acc (rows last) ← op t applied, x being the input op t sees."""
    s, form = t.strength, t.form
    xb = _block_in(x, t.cols, g)
    if isinstance(form, ADDITIVE):
        _add_rows(acc, t.rows, s * _additive(form, xb, g, acc.dtype))
    elif isinstance(form, GLoRAForm):
        _add_rows(acc, t.rows, s * _additive(form.add_part, xb, g, acc.dtype))
    elif isinstance(form, Replacement):
        _set_rows(acc, t.rows, (1 - s) * _rows(acc, t.rows) + s * _additive(form.value, xb, g, acc.dtype))
    elif isinstance(form, DoRAForm):
        c = form.factor()
        if form.on_output:
            block = _rows(acc, t.rows) * (1 + s * (c - 1)).to(acc.dtype)
            _set_rows(acc, t.rows, block + (s * c).to(acc.dtype) * _additive(form.inner, xb, g, acc.dtype))
        else:
            shape = [1] * xb.ndim
            shape[1 if g.conv else -1] = -1
            _add_rows(acc, t.rows, s * _additive(form.inner, xb * c.reshape(shape).to(xb.dtype), g, acc.dtype))
    elif t.left:  # row transforms; column scales acted on the input already
        _set_rows(acc, t.rows, form.left(_rows(acc, t.rows), s))


def _adapted_forward(self, x, *args, **kwargs):
    """Installed as a patched layer's `forward`: base forward (the host's own) plus the adapter terms. Should a term
    fail here (every form was probed at the switch), the layer goes on without its adapters and says so once:
    sampling never fails because of an adapter."""
    state = self.__dict__["_lib_adapters_state"]
    try:
        return state.run(self, x, args, kwargs)
    except (RuntimeError, ValueError, IndexError) as e:
        if not state.terms:
            raise
        sources = sorted({t.op.source.partition("|")[0] for t in state.terms})
        print(f"[Adapters] error: {', '.join(sources)} left out on layer type {type(self).__name__}: {e}",
              file=sys.stderr, flush=True)
        state.terms = []
        return state.run(self, x, args, kwargs)


# ---- the engine ------------------------------------------------------------------------------------------------------

@dataclass
class Layer:
    module: nn.Module
    state: AdapterState
    holder: nn.Module
    holder_name: str
    structure: tuple
    weight_name: str
    skipped: list = None  # operations of this layer left out at attach (reported again at each reconcile)


@dataclass
class Skipped:
    """An operation the engine could not apply, and why (for the host's one-line message)."""

    op: Operation
    reason: str


class ForwardEngine:
    """Applies plans on the layers of `root` in their forward pass; `path_of(weight name)` gives the dotted path of
    the parameter in `root` (None: not this engine's). `factor_dtype`: the dtype factors are kept and computed in
    (None: float32). `host_dequantize`: the host's reader for bnb 4-bit weights."""

    def __init__(self, root: nn.Module, path_of: Callable[[str], str | None] = lambda n: n,
                 factor_dtype: torch.dtype | None = None, host_dequantize: Callable | None = None):
        self.root = root
        self.path_of = path_of
        self.factor_dtype = factor_dtype or torch.float32
        self.host_dequantize = host_dequantize
        self.layers: dict[str, Layer] = {}
        self.skipped: list[Skipped] = []

    # ---- public API -------------------------------------------------------------------------------------------------
    def reconcile(self, plan: Plan) -> dict[str, int]:
        """Bring the layers to exactly `plan`: new or changed layers built, strength-only changes set as numbers,
        layers no longer planned restored. Operations it cannot apply are left out and listed in `self.skipped`."""
        try:
            return self._reconcile(plan)
        except BaseException:  # any failure: every layer back to its own forward, never half a set
            self.restore()
            raise

    def _reconcile(self, plan: Plan) -> dict[str, int]:
        stats = {"built": 0, "strengths": 0, "restored": 0, "kept": 0}
        self.skipped = []
        for name in [n for n in self.layers if n not in plan]:
            self._detach(name)
            stats["restored"] += 1
        for name, ops in plan.items():
            structure = tuple((op.source, op.target) for op in ops)
            layer = self.layers.get(name)
            if layer is not None and layer.structure == structure:
                wanted = {(op.source, op.target): op.strength for op in ops}
                values = [wanted[(t.op.source, t.op.target)] for t in layer.state.terms]
                changed = [t.strength != v for t, v in zip(layer.state.terms, values)]
                self.skipped += layer.skipped or []
                if any(changed):
                    self._set(layer, values, changed)
                    stats["strengths"] += 1
                else:
                    stats["kept"] += 1
                continue
            if layer is not None:
                self._detach(name)
            if self._attach(name, ops):
                stats["built"] += 1
        return stats

    def set_strengths(self, strength_of: Callable[[Operation], float]) -> None:
        """New strengths for the attached operations (e.g. one per sampling step): numbers only."""
        for layer in self.layers.values():
            values = [float(strength_of(t.op)) for t in layer.state.terms]
            changed = [v != t.strength for v, t in zip(values, layer.state.terms)]
            if any(changed):
                self._set(layer, values, changed)

    def restore(self) -> None:
        """Every layer back to its own forward; nothing is held."""
        for name in list(self.layers):
            self._detach(name)

    def nbytes(self) -> int:
        """Bytes of factors held by the attached layers."""
        return sum(layer.state.nbytes() for layer in self.layers.values())

    def adapted(self) -> list[str]:
        return list(self.layers)

    def storage(self, name: str) -> Storage | None:
        """The storage of a planned weight name (None: not in `root`)."""
        found = self._module(name)
        return storage_of(found[0], found[1]) if found is not None else None

    def takes(self, name: str) -> bool:
        """Whether the layer holding `name` runs its own forward with this weight (Linear/Conv2d, known storage,
        not read directly by a parent as MultiheadAttention reads `out_proj.weight`)."""
        found = self._module(name)
        if found is None:
            return False
        module, attr, chain = found
        storage = storage_of(module, attr)
        if attr != "weight" or not storage.known or geometry_of(module, storage.shape) is None:
            return False
        return not (len(chain) > 1 and isinstance(chain[-2][1], nn.MultiheadAttention))

    # ---- internals --------------------------------------------------------------------------------------------------
    def _module(self, name: str) -> tuple[nn.Module, str, list[tuple[str, nn.Module]]] | None:
        path = self.path_of(name)
        if path is None:
            return None
        *parts, attr = path.split(".")
        chain = [("", self.root)]
        node = self.root
        for part in parts:
            node = getattr(node, part, None)
            if not isinstance(node, nn.Module):
                return None
            chain.append((part, node))
        return node, attr, chain

    def _attach(self, name: str, ops: list[Operation]) -> bool:
        found = self._module(name)
        if found is None:
            self.skipped += [Skipped(op, "is not a layer of this model") for op in ops]
            return False
        module, attr, chain = found
        storage = storage_of(module, attr)
        kind = f"{type(module).__name__} ({storage.kind} weight)"
        geometry = geometry_of(module, storage.shape) if attr == "weight" else None
        if geometry is None or not storage.known:
            self.skipped += [Skipped(op, f"layer type {kind} cannot take adapters here") for op in ops]
            return False
        terms: list[Term] = []
        skipped_before = len(self.skipped)
        for op in ops:
            block = _block_shape(storage.shape, op)
            try:
                form = op.patch.forward_form(block)
            except (RuntimeError, ValueError) as e:
                form, why = None, str(e)
            else:
                why = "has no forward form"
            if form is None:
                self.skipped.append(Skipped(op, f"{op.patch.kind} on layer type {kind} {why}"))
                continue
            form = form.map_tensors(lambda t: t.to(device=_device(module, attr), dtype=self.factor_dtype))
            try:
                bias = op.patch.delta_bias(torch.zeros(block[0])) if isinstance(op.patch, DeltaPatch) else None
                if bias is not None:
                    bias = bias.reshape(-1).to(device=_device(module, attr), dtype=self.factor_dtype)
                term = Term(op, form, op.strength, _row_index(op, storage.shape[0], _device(module, attr)),
                            op.target.cols, bias)
                _probe(term, geometry, storage.shape, block)
            except (RuntimeError, ValueError, IndexError) as e:
                self.skipped.append(Skipped(op, f"{op.patch.kind} does not fit layer type {kind}: {e}"))
                continue
            terms.append(term)
        if not terms:
            return False
        state = AdapterState(terms, geometry, lambda: self._bias(module))
        try:
            self._fill_norms(module, attr, state, range(len(terms)))
        except (AdapterError, RuntimeError) as e:
            self.skipped += [Skipped(t.op, f"DoRA on layer type {kind}: {e}") for t in terms]
            return False
        holder_name, holder = _holder(chain, name)
        holder.add_module(holder_name, state)
        state.previous_forward = module.__dict__.get("forward")
        module.__dict__["_lib_adapters_state"] = state
        module.forward = types.MethodType(_adapted_forward, module)
        self.layers[name] = Layer(module, state, holder, holder_name, tuple((op.source, op.target) for op in ops), name,
                                  self.skipped[skipped_before:])
        return True

    def _bias(self, module: nn.Module) -> Tensor | None:
        if getattr(module, "bias", None) is None:
            return None
        return dequantized(module, "bias", torch.float32, self.host_dequantize)

    def _set(self, layer: Layer, values: list[float], changed: list[bool]) -> None:
        terms = layer.state.terms
        for t, v in zip(terms, values):
            t.strength = v
        first = changed.index(True)
        later_dora = [k for k, t in enumerate(terms) if isinstance(t.form, DoRAForm) and k > first]
        if later_dora:  # ‖W_{k−1} + Δ‖ depends on the strengths before op k
            module, attr, _ = self._module(layer.weight_name)
            self._fill_norms(module, attr, layer.state, later_dora)

    def _fill_norms(self, module: nn.Module, attr: str, state: AdapterState, which) -> None:
        """DoRA norms ‖W_{k−1} + Δ_k‖ from the dequantized weight and the ops before k (once per switch)."""
        which = [k for k in which if isinstance(state.terms[k].form, DoRAForm)]
        if not which:
            return
        base = dequantized(module, attr, torch.float32, self.host_dequantize)
        for k in which:
            t = state.terms[k]
            before = [dataclasses_replace(p.op, p.strength) for p in state.terms[:k] if p.strength != 0]
            w, _ = compute(before, base, None) if before else (base, None)
            part = _rows_of(w, t.op)
            patch = t.op.patch
            merged = part + patch.inner.delta(part)
            norm = column_norm(merged, patch.on_output)
            t.form = DoRAForm(t.form.inner, t.form.magnitude, t.form.on_output,
                              norm.reshape(-1).to(device=_first_tensor(t.form.inner).device, dtype=self.factor_dtype))

    def _detach(self, name: str) -> None:
        layer = self.layers.pop(name)
        module = layer.module
        module.__dict__.pop("_lib_adapters_state", None)
        if layer.state.previous_forward is not None:
            module.__dict__["forward"] = layer.state.previous_forward
        else:
            module.__dict__.pop("forward", None)
        if layer.holder._modules.get(layer.holder_name) is layer.state:
            del layer.holder._modules[layer.holder_name]


def _probe(term: Term, g: Geometry, shape: tuple[int, ...], block: tuple[int, ...]) -> None:
    """Run the term once on a one-sample zero input, so a form that does not fit fails here (reported), not in
    sampling (a failed generation)."""
    kernel = shape[2:] if g.conv else ()
    x = torch.zeros(1, shape[1], *[k * 2 for k in kernel], dtype=_first_tensor(term.form).dtype,
                    device=_first_tensor(term.form).device)
    acc = torch.zeros(1, *([1] * len(kernel)), shape[0], dtype=x.dtype, device=x.device)
    if g.conv:
        acc = _zero_conv_out(x, shape, g)
    if isinstance(term.form, DoRAForm) and term.form.norm is None:
        ones = torch.ones(block[0] if term.form.on_output else block[1], dtype=x.dtype, device=x.device)
        term = Term(term.op, DoRAForm(term.form.inner, term.form.magnitude, term.form.on_output, ones), term.strength,
                    term.rows, term.cols, term.bias)
    if term.right:
        x = _right(term, x, g)
    _apply_term(term, acc, x, g)
    if term.bias is not None:
        _add_rows(acc, term.rows, term.bias.to(acc.dtype))


def _zero_conv_out(x: Tensor, shape: tuple[int, ...], g: Geometry) -> Tensor:
    """A zero conv output (channels last) of the layer's geometry for input `x`."""
    out = torch.nn.functional.conv2d(x, torch.zeros(shape, dtype=x.dtype, device=x.device), None, g.stride, g.padding,
                                     g.dilation)
    return out.movedim(1, -1).contiguous()


def dataclasses_replace(op: Operation, strength: float) -> Operation:
    return Operation(op.patch, strength, op.target, op.source)


def _device(module: nn.Module, attr: str) -> torch.device:
    return getattr(module, attr).device


def _block_shape(shape: tuple[int, ...], op: Operation) -> tuple[int, ...]:
    rows, cols = op.target.rows, op.target.cols
    out = list(shape)
    if rows is not None:
        out[0] = rows[1] - rows[0]
    if cols is not None:
        out[1] = cols[1] - cols[0]
    return tuple(out)


def _row_index(op: Operation, total: int, device) -> object:
    """Model rows of the op's output, in the adapter's row order: None (all), a slice, or an index tensor."""
    rows, order = op.target.rows, getattr(op.target, "order", None)
    lo, hi = rows if rows is not None else (0, total)
    if order is None:
        return None if rows is None else slice(lo, hi)
    return torch.cat([torch.arange(lo + a, lo + b) for a, b in order]).to(device)


def _rows_of(w: Tensor, op: Operation) -> Tensor:
    rows, order = op.target.rows, getattr(op.target, "order", None)
    lo, hi = rows if rows is not None else (0, w.shape[0])
    block = w[lo:hi]
    if order is not None:
        block = torch.cat([block[a:b] for a, b in order])
    if op.target.cols is not None:
        block = block[:, op.target.cols[0]:op.target.cols[1]]
    return block


def _holder(chain: list[tuple[str, nn.Module]], name: str) -> tuple[str, nn.Module]:
    """Where the layer's state is registered: the layer itself when `.to()` recurses into its children, else its
    nearest plain ancestor (not a container, default `_apply`) under a name made from the path below it."""
    containers = (nn.Sequential, nn.ModuleList, nn.ModuleDict)
    below: list[str] = []
    for part, node in reversed(chain):
        if type(node)._apply is nn.Module._apply and not isinstance(node, containers):
            suffix = "_".join(reversed(below))
            return (STATE_NAME + ("__" + suffix if suffix else "")), node
        below.append(part)
    return STATE_NAME + "__" + "_".join(reversed(below)), chain[0][1]


__all__ = ["AdapterState", "ForwardEngine", "Skipped", "Storage", "dequantized", "geometry_of", "storage_of"]
