"""Tracing a model into a ``torch.fx`` graph whose atoms are the layers autogrow knows.

    >>> import torch.nn as nn
    >>> net = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    >>> sorted(call_sites(trace(net)))
    ['0', '1', '2']
"""

from __future__ import annotations

import contextlib
import inspect
import traceback
from collections.abc import Iterator

import torch.fx as fx
import torch.nn as nn

from autogrow.bound import bound_sizes
from autogrow.errors import UNFUSE_HINT, fail
from autogrow.ops import OpKind, classify_module

__all__ = ["call_sites", "describe", "not_called", "trace", "unwrap"]

try:  # torch.compile's wrapper; its original module holds the live parameters
    from torch._dynamo.eval_frame import OptimizedModule
except ImportError:  # pragma: no cover - torch builds without dynamo
    OptimizedModule = ()  # type: ignore[assignment,misc]


class _Tracer(fx.Tracer):
    proxy_buffer_attributes = True  # buffers sliced with sizes (causal masks) must stay symbolic

    def call_module(self, m: nn.Module, forward: object, args: tuple, kwargs: dict) -> object:
        if isinstance(m, OptimizedModule):  # trace what was compiled; surgery then triggers a recompile
            return self.call_module(m._orig_mod, m._orig_mod.forward, args, kwargs)
        return super().call_module(m, forward, args, kwargs)

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        # Registered layers are atoms; everything else (Sequential, user blocks) is traced through, torch's
        # transformer layers too (their Linears and norms grow; their attention once unfused, autogrow.attention).
        if classify_module(m).kind is not OpKind.OTHER:
            return True
        if isinstance(m, _TRANSFORMER_LAYERS):
            return False
        return super().is_leaf_module(m, qualname)


_TRANSFORMER_LAYERS = (nn.Transformer, nn.TransformerEncoder, nn.TransformerDecoder, nn.TransformerEncoderLayer,
                       nn.TransformerDecoderLayer)


def unwrap(model: nn.Module, name: str) -> tuple[nn.Module, str]:
    """``torch.compile(model)`` -> the compiled module and ``name`` relative to it (a leading
    ``_orig_mod.`` dropped): surgery works on the original module, dynamo recompiles after it."""
    while isinstance(model, OptimizedModule):
        model = model._orig_mod
        name = name.removeprefix("_orig_mod.")
    return model, name


def trace(model: nn.Module) -> fx.Graph:
    """The model's forward as an ``fx.Graph``.

    Raises:
        AutogrowError: torch.fx could not trace the forward (data-dependent control flow).
    """
    try:
        with _undecorated_forward(type(model)), bound_sizes(model):  # sizes in attributes: autogrow.bound
            return _Tracer().trace(model)
    except Exception as e:  # fx raises many types for data-dependent control flow
        where = _user_frame(e)
        why = ("autogrow needs a forward without data-dependent Python control flow (if/for on tensor values or "
               "sizes); move such code out of forward, or grow the submodule that does trace")
        fail(f"model: torch.fx could not trace {type(model).__name__}.forward ({type(e).__name__}: "
             f"{str(e).splitlines()[0] if str(e) else ''}){where}: {why}.")


@contextlib.contextmanager
def _undecorated_forward(cls: type) -> Iterator[None]:
    """Trace the function under a ``functools.wraps`` decorator of the root's forward (torch.fx would patch the
    wrapper's code with the wrapped function's argument count and fail); the grown model is still checked by
    running its real, decorated forward."""
    original = cls.forward
    if not hasattr(original, "__wrapped__"):
        yield
        return
    own = "forward" in cls.__dict__
    cls.forward = inspect.unwrap(original)
    try:
        yield
    finally:
        if own:
            cls.forward = original
        else:
            del cls.forward


def _user_frame(e: BaseException) -> str:
    """`` at file:line `code` ``: the last frame of the failing trace outside torch and this tracer (the call to
    change)."""
    frames = [f for f in traceback.extract_tb(e.__traceback__)
              if "/torch/" not in f.filename and f.filename != __file__]
    if not frames:
        return ""
    f = frames[-1]
    return f" at {f.filename.rsplit('/', 1)[-1]}:{f.lineno} `{(f.line or '').strip()}`"


def call_sites(graph: fx.Graph) -> dict[str, list[fx.Node]]:
    """Module name -> the nodes that call it, in graph order (a shared module has several)."""
    sites: dict[str, list[fx.Node]] = {}
    for node in graph.nodes:
        if node.op == "call_module":
            sites.setdefault(node.target, []).append(node)
    return sites


def describe(node: fx.Node, model: nn.Module | None = None) -> str:
    """``node 'name' (op target[: ModuleType])`` for messages."""
    target = node.target if isinstance(node.target, str) else getattr(node.target, "__name__", node.target)
    if model is not None and node.op == "call_module":
        target = f"{target}: {type(model.get_submodule(node.target)).__name__}"
    return f"node '{node.name}' ({node.op} {target})"


def not_called(model: nn.Module, name: str, sites: dict[str, list[fx.Node]], what: str) -> str:
    """Why module ``name`` has no call site: it is missing, inside an opaque (untraced) module, or unused."""
    callable_ = [n for n in sites if classify_module(model.get_submodule(n)).kind is OpKind.WEIGHTED]
    try:
        module = model.get_submodule(name)
    except AttributeError:
        return f"{name!r} is not a module called in forward (no such submodule); {what}: {callable_}"
    if classify_module(module).kind is OpKind.OTHER and any(True for _ in module.parameters(recurse=False)):
        return (f"{name!r} is a {type(module).__name__} with its own parameters, which autogrow does not know as a "
                f"layer (torch.fx traced through it); register it with autogrow.register_layer("
                f"{type(module).__name__}, LayerSpec(...)), or grow one of: {callable_}")
    parts = name.split(".")
    for i in range(len(parts) - 1, 0, -1):
        outer = ".".join(parts[:i])
        if isinstance(model.get_submodule(outer), nn.MultiheadAttention):
            return (f"{name!r} is inside {outer!r} (MultiheadAttention), whose fused forward uses its weights without "
                    f"calling it. {UNFUSE_HINT} Or grow one of: {callable_}")
        if outer in sites:
            kind = type(model.get_submodule(outer)).__name__
            return (f"{name!r} is inside {outer!r} ({kind}), which torch.fx records as one opaque call (it does not "
                    f"trace into torch.nn's own layers); autogrow can grow only what it sees. Write the block from "
                    f"Linear/LayerNorm/attention ops (see autogrow's TinyGPT), or grow one of: {callable_}")
    return f"{name!r} is not called in forward; {what}: {callable_}"
