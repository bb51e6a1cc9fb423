"""The models people actually train: torchvision, timm and transformers definitions, small configs, random
weights, float64. Every sampled growth is exact (output unchanged to 1e-9, an Adam step runs) or refused
with the model and optimizer byte-identical; and what grows on each model is what we found. The full
sweep (every weighted layer, every operation) is ``python -m autogrow.experiments.zoo``, results in
``experiments/results/zoo.md``.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Callable
from typing import Any

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from autogrow.experiments import zoo

import autogrow
from tests.models import max_rel_error
from tests.test_refusals import assert_unchanged, snapshot
from tests.torchvision_without_ops import import_torchvision_without_ops

import_torchvision_without_ops()  # a CUDA torchvision next to a CPU torch (conftest has done it already)
pytest.importorskip("torchvision")
pytest.importorskip("timm")
pytest.importorskip("transformers")

EXACT = "exact"
TRACE = r"torch\.fx could not trace"  # transformers' forwards: see test_transformers_do_not_trace
DEPTHWISE = r"is a channel-wise Conv2d.*grows with the layer that produces its input"
OUTPUT = r"is the model's output"

# model -> [(layer, operation, "exact" or a regex the refusal must match)]: a sample of the full sweep,
# chosen to show what grows on each model and why the rest is refused.
CASES: dict[str, list[tuple[str, str, str]]] = {
    # ResNet-18 grows everywhere but the classifier's output. The stem, a downsample conv or any block's
    # conv2 widens a whole stage's residual stream (all of its conv2s, BatchNorms and the downsample).
    "resnet18": [
        ("conv1", "widen x2", EXACT),
        ("layer1.0.conv1", "widen +1", EXACT),
        ("layer2.0.downsample.0", "widen x2", EXACT),
        ("fc", "widen x2", OUTPUT),
        ("layer3.0.conv2", "deepen", EXACT),
        ("fc", "deepen", EXACT),
    ],
    # ResNeXt: a bottleneck's conv1 grows with its grouped 3x3 conv, by whole groups of fresh units (init "auto",
    # the callback's default; Net2WiderNet copies are refused there); the grouped conv is not a target of its own.
    "resnext": [
        ("conv1", "widen x2", EXACT),
        ("layer1.0.conv1", "widen x2", r"init: 'net2wider' is not allowed.*act on groups of channels"),
        ("layer2.0.conv1", "widen x2 auto", EXACT),
        ("layer2.0.conv1", "widen +1 auto", r"grows by whole groups: 32 \+ a multiple of 8"),
        ("layer1.0.conv2", "widen x2", r"is a channel-wise Conv2d.*grows with the layer that produces its input"),
        ("layer3.0.conv2", "deepen", EXACT),
    ],
    # MobileNetV3: the stem and expansion convs grow together with the depthwise convs they feed (one
    # filter per channel, copied), the squeeze-excitation layers, the projection convs (with their residual
    # streams) and the classifier's hidden layer grow; a depthwise conv is not a target of its own.
    # Deepening works everywhere (after a depthwise conv: a full identity conv).
    "mobilenet_v3_small": [
        ("features.0.0", "widen x2", EXACT),
        ("features.1.block.1.fc1", "widen +1", EXACT),
        ("features.1.block.1.fc2", "widen x2", EXACT),
        ("features.2.block.1.0", "widen x2", DEPTHWISE),
        ("features.5.block.3.0", "widen x2", EXACT),
        ("classifier.0", "widen x2", EXACT),
        ("features.2.block.1.0", "deepen", EXACT),
        ("classifier.0", "deepen", EXACT),
    ],
    # ViT: d_model grows (patch embedding, attention and MLP outputs, the cls token and position embedding as
    # bare Parameters, timm's LayerNorm registered by the zoo as a user would); the fused qkv grows by whole heads
    # (reshaped to self.num_heads heads, an attribute the growth rewrites: autogrow.bound). Deepening works after
    # every layer (a residual block after GELU).
    "vit_tiny": [
        ("patch_embed.proj", "widen x2", EXACT),
        ("patch_embed.proj", "widen x2 ramp", EXACT),  # timm's LayerNorm, registered as nn.LayerNorm: it ramps
        ("blocks.0.attn.qkv", "widen x2", EXACT),
        ("blocks.1.attn.qkv", "widen +1", r"577 .*a multiple of 192 \(3 equal parts of whole heads of 64\)"),
        ("blocks.0.mlp.fc1", "widen +1", EXACT),
        ("blocks.1.mlp.fc1", "widen x2", EXACT),
        ("blocks.1.mlp.fc2", "widen x2", EXACT),
        ("head", "widen x2", OUTPUT),
        ("blocks.0.attn.qkv", "deepen", EXACT),
        ("blocks.1.mlp.fc1", "deepen", EXACT),
    ],
    # ConvNeXt: the MLP hidden width (1x1 conv fc1) and the stream grow (depthwise 7x7 convs, timm's LayerNorm2d
    # registered by the zoo, LayerScale gamma as a bare Parameter). Deepening works everywhere.
    "convnext_atto": [
        ("stem.0", "widen x2", EXACT),
        ("stages.0.blocks.0.conv_dw", "widen x2", DEPTHWISE),
        ("stages.1.blocks.0.mlp.fc1", "widen x2", EXACT),
        ("stages.2.blocks.1.mlp.fc1", "widen +1", EXACT),
        ("stages.2.blocks.1.mlp.fc2", "widen x2", EXACT),
        ("stem.0", "deepen", EXACT),
        ("stages.3.blocks.0.conv_dw", "deepen", EXACT),
    ],
    # transformers (v5): torch.fx cannot trace them (test_transformers_do_not_trace); autogrow traces what their
    # forward runs on the batch (autogrow.capture). GPT-2's MLP grows and every layer deepens; its d_model, tied
    # to lm_head, grows with mixtures (not copies); its c_attn by whole heads (split by self.split_size, which the
    # growth rewrites: autogrow.bound). BERT grows
    # d_model, heads and FFN; Llama (its RMSNorm registered by the zoo, as a user would) d_model (also ramped in), MLP
    # and its grouped-query heads (a key/value head with its 2 query heads; tests/test_gqa.py).
    "gpt2": [
        ("transformer.h.0.mlp.c_fc", "widen x2", EXACT),
        ("transformer.h.0.mlp.c_fc", "deepen", EXACT),
        ("transformer.wte", "widen x2", r"lm_head.weight and transformer.wte.weight are one tied Parameter"),
        ("transformer.wte", "widen x2 auto", EXACT),  # mixtures: ln_f's new entries start at 0 (autogrow.tied)
        ("transformer.wte", "widen x2 ramp", EXACT),  # fresh units the LayerNorms ramp in, the tie kept
        ("transformer.h.0.attn.c_attn", "widen x2", EXACT),
        ("transformer.h.1.attn.c_attn", "widen +1", r"97 .*a multiple of 48 \(3 equal parts of whole heads of 16\)"),
    ],
    "bert": [
        ("bert.embeddings.word_embeddings", "widen x2", EXACT),
        ("bert.embeddings.word_embeddings", "widen x2 ramp", EXACT),  # post-norm: each LayerNorm zeroes the new units
        ("bert.encoder.layer.0.attention.self.query", "widen x2", EXACT),
        ("bert.encoder.layer.0.intermediate.dense", "widen +1", EXACT),
        ("bert.encoder.layer.0.intermediate.dense", "deepen", EXACT),
    ],
    "llama": [
        ("model.embed_tokens", "widen x2", EXACT),
        ("model.embed_tokens", "widen x2 ramp", EXACT),  # LlamaRMSNorm, registered as nn.RMSNorm, ramps by scaling
        ("model.layers.0.mlp.up_proj", "widen x2", EXACT),
        ("model.layers.0.self_attn.k_proj", "widen x2", EXACT),
        ("model.layers.0.self_attn.q_proj", "widen x2", EXACT),
        ("model.layers.0.self_attn.q_proj", "widen +1", r"not a whole number of heads"),
        ("model.layers.0.mlp.gate_proj", "deepen", EXACT),
    ],
    # More decoder LMs as transformers defines them. GPT-NeoX (Pythia): the fused qkv viewed as (heads, 3 * head
    # size) grows by whole heads, d_model through attention and MLP in parallel. Qwen2: Llama's shape with biases
    # on q/k/v. Phi-3: its fused gate_up_proj grows in two equal parts; its qkv_proj is sliced at offsets computed
    # from the config (unequal parts under grouped-query attention), refused by name. OPT: its learned position
    # embedding (an nn.Embedding with a forward of its own) registered by the zoo as a user would; d_model tied to
    # lm_head grows by fresh units the LayerNorms ramp in (copies refused, as on GPT-2).
    "gpt_neox": [
        ("gpt_neox.embed_in", "widen x2", EXACT),
        ("gpt_neox.layers.0.attention.query_key_value", "widen x2", EXACT),
        ("gpt_neox.layers.1.attention.query_key_value", "widen +1", r"not a whole number of heads"),
        ("gpt_neox.layers.0.mlp.dense_h_to_4h", "widen +1", EXACT),
    ],
    "qwen2": [
        ("model.embed_tokens", "widen x2 ramp", EXACT),
        ("model.layers.0.self_attn.k_proj", "widen x2", EXACT),
        ("model.layers.1.mlp.up_proj", "widen +1", EXACT),
    ],
    # Qwen3 normalises q and k per head over the head size (q_norm, k_norm: a norm over another axis than the heads
    # passes them through, each head on its own): its grouped-query heads grow from q, k or v.
    "qwen3": [
        ("model.layers.0.self_attn.q_proj", "widen x2", EXACT),
        ("model.layers.1.self_attn.v_proj", "widen x2", EXACT),
        ("model.layers.0.self_attn.k_proj", "widen +1", r"not a whole number of heads"),
    ],
    # OLMo-2 normalises q and k over all heads together (refused by name); Gemma's RMSNorm computes x * (1 + w),
    # left unregistered, and its embedding scales its output (a class of its own: refused, naming it); GPT-J rotates
    # interleaved pairs of part of each head (stack((-x2, x1), -1).flatten(-2)), Phi the first part of each head:
    # their heads grow; StarCoder's multi-query c_attn splits into unequal parts (refused).
    "olmo2": [
        ("model.embed_tokens", "widen x2", EXACT),
        ("model.layers.0.self_attn.q_proj", "widen x2", EXACT),  # its q_norm/k_norm over all heads, copied
        ("model.layers.1.self_attn.k_proj", "widen +1", r"not a whole number of heads"),
    ],
    "gemma": [
        ("model.layers.0.self_attn.q_proj", "widen x2", EXACT),
        ("model.embed_tokens", "widen x2", r"GemmaTextScaledWordEmbedding with its own parameters.*register"),
    ],
    "gptj": [("transformer.h.0.attn.q_proj", "widen x2", EXACT)],
    "phi": [("model.layers.1.self_attn.k_proj", "widen x2", EXACT)],
    "gpt_bigcode": [
        ("transformer.h.0.mlp.c_fc", "widen x2", EXACT),
        ("transformer.h.0.attn.c_attn", "widen x2", r"multi-query .* keeps 4 in num_heads, num_key_value_groups"),
    ],
    "gpt_bigcode_eager": [
        ("transformer.h.0.attn.c_attn", "widen x2", EXACT),
        ("transformer.h.1.attn.c_attn", "widen +1", r"49 is not allowed; expected 16 plus a multiple of 8"),
    ],
    "distilbert": [("distilbert.transformer.layer.0.attention.q_lin", "widen x2", EXACT)],
    "mistral": [("model.layers.0.self_attn.k_proj", "widen x2", EXACT)],
    "stablelm": [("model.layers.1.self_attn.q_proj", "widen x2", EXACT), ("model.embed_tokens", "widen x2", EXACT)],
    "roberta": [("roberta.encoder.layer.0.attention.self.value", "widen x2", EXACT)],
    "bloom": [("transformer.h.0.self_attention.query_key_value", "widen x2", r"'baddbmm' .* cannot keep exact")],
    "gpt_neo": [("transformer.h.0.attn.attention.q_proj", "widen x2", EXACT),  # through where(mask, scores, min)
                ("transformer.wte", "widen x2 ramp", EXACT)],
    "phi3": [
        ("model.embed_tokens", "widen x2", EXACT),
        ("model.layers.0.mlp.gate_up_proj", "widen x2", EXACT),
        ("model.layers.0.self_attn.qkv_proj", "widen x2", r"indexes the widened units' axis with slice"),
    ],
    "opt": [
        ("model.decoder.embed_tokens", "widen x2 ramp", EXACT),
        ("model.decoder.embed_tokens", "widen x2", r"one tied Parameter"),
        ("model.decoder.layers.0.self_attn.q_proj", "widen x2", EXACT),
        ("model.decoder.layers.1.fc1", "deepen", EXACT),
    ],
    # Falcon (its FalconLinear registered as the Linear it is): the fused qkv viewed as (key/value groups, group + 2,
    # head size) grows by whole groups, num_heads and num_kv_heads rewritten (autogrow.bound).
    "falcon": [
        ("transformer.h.0.self_attention.query_key_value", "widen x2", EXACT),
        ("transformer.h.1.self_attention.query_key_value", "widen +1", r"not a whole number of them"),
        ("transformer.word_embeddings", "widen x2 ramp", EXACT),
        ("transformer.h.0.mlp.dense_h_to_4h", "widen +1", EXACT),
    ],
    # torch's own nn.TransformerEncoder: traced through; after autogrow.unfuse_attention every dimension grows
    # (heads by whole heads), left fused only its feed-forward width, the refusals naming unfuse_attention.
    "torch_encoder": [
        ("emb", "widen x2", EXACT),
        ("enc.layers.0.self_attn.k", "widen x2", EXACT),
        ("enc.layers.0.self_attn.q", "widen +1", r"not a whole number of heads"),
        ("enc.layers.1.linear1", "widen +1", EXACT),
        ("enc.layers.1.linear1", "deepen", EXACT),
    ],
    "torch_encoder_fused": [
        ("enc.layers.0.linear1", "widen x2", EXACT),
        ("emb", "widen x2", r"multi_head_attention_forward.*unfuse_attention"),
        ("enc.layers.0.self_attn.out_proj", "widen x2", r"inside .*MultiheadAttention.*unfuse_attention"),
        ("enc.layers.0.linear1", "deepen", r"fused fast path .*unfuse_attention"),
    ],
    # Their MLP blocks on their own grow: BERT's, Llama's (gate and up projections together: their outputs are
    # multiplied) and GPT-2's (transformers' Conv1D, a Linear with its weight stored (in, out), registered by the
    # zoo as a user would; its gelu_new computes x ** 3).
    "gpt2_mlp": [
        ("c_fc", "widen x2", EXACT),
        ("c_fc", "widen +1", EXACT),
        ("c_proj", "widen x2", OUTPUT),
        ("c_fc", "deepen", EXACT),
    ],
    "bert_ffn": [
        ("intermediate.dense", "widen x2", EXACT),
        ("output.dense", "widen +1", r"placeholder x\).*whose width is fixed"),
        ("intermediate.dense", "deepen", EXACT),
    ],
    "llama_mlp": [
        ("gate_proj", "widen x2", EXACT),
        ("up_proj", "widen +1", EXACT),
        ("down_proj", "widen x2", OUTPUT),
        ("gate_proj", "deepen", EXACT),
    ],
}

# (model, layer, operation) -> why it fails today: xfailed at runtime until the core is fixed.
KNOWN_FAILURES: dict[tuple[str, str, str], str] = {}


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """Small tensors: one intra-op thread is as fast, and immune to OpenMP threads spinning against other
    processes on a shared machine (two threads there made some cases 10-100x slower)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def built() -> Callable[[str], tuple[nn.Module, Any]]:
    """Each zoo model built once (seeded, float64) with its example inputs; every case copies it."""
    cache: dict[str, tuple[nn.Module, Any]] = {}

    def get(name: str) -> tuple[nn.Module, Any]:
        if name not in cache:
            cache[name] = zoo.build(zoo.MODELS[name])
        return cache[name]

    return get


def test_cases_name_real_layers(built):
    """The sample names real weighted layers (a renamed layer upstream must not pass silently)."""
    for model, cases in CASES.items():
        layers = set(zoo.weighted_layers(built(model)[0]))
        assert {layer for layer, _, _ in cases} <= layers, model
        assert len(cases) <= 12


@pytest.mark.parametrize("model, layer, op, expected",
                         [(m, *case) for m, cases in CASES.items() for case in cases],
                         ids=[f"{m}:{layer}:{op}" for m, cases in CASES.items() for layer, op, _ in cases])
def test_growth_is_exact_or_cleanly_refused(built, model, layer, op, expected):
    prototype, x = built(model)
    o = zoo.run_op(zoo.MODELS[model], prototype, x, layer, op, snap=snapshot, unchanged=assert_unchanged)
    if o.kind in zoo.BAD:
        problem = f"{o.kind}: {o.detail}"
    elif expected == EXACT:
        problem = "" if o.kind == "exact" else f"expected exact, got {o.kind}: {o.detail}"
    elif o.kind != "refused":
        problem = f"expected a refusal matching {expected!r}, got {o.kind}"
    else:
        problem = "" if re.search(expected, o.detail) else f"expected a refusal matching {expected!r}: {o.detail}"
    if problem and (model, layer, op) in KNOWN_FAILURES:
        pytest.xfail(f"{KNOWN_FAILURES[(model, layer, op)]} ({problem})")
    assert not problem, problem


@pytest.mark.parametrize("model", ["gpt2", "bert", "llama"])
def test_transformers_do_not_trace(built, model):
    """torch.fx cannot trace transformers v5 models, as such or behind the usual ``input_ids -> logits`` wrapper
    (mask creation and embeddings branch on tensor sizes): autogrow traces what they run instead (CASES)."""
    prototype, _ = built(model)
    traces = zoo.tracing(zoo.MODELS[model], prototype)
    assert set(traces) == {"model", "Logits(model)"}
    for what, message in traces.items():
        assert re.search(TRACE, message), (what, message)
    assert re.search(r"TraceError|TypeError", traces["Logits(model)"])


def _returns_tuple(f: Callable) -> Callable:
    """transformers' ``@can_return_tuple``, reduced: a ``functools.wraps`` wrapper ``(self, *args, **kwargs)``."""
    @functools.wraps(f)
    def wrapper(self, *args, **kwargs):
        return f(self, *args, **kwargs)
    return wrapper


class DecoratedForward(nn.Module):
    """A plain MLP whose forward has ``**kwargs`` and a ``functools.wraps`` decorator, as every transformers
    v5 model's forward has."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(4, 8), nn.Linear(8, 2)

    @_returns_tuple
    def forward(self, x, mask=None, **kwargs):
        return self.fc2(torch.relu(self.fc1(x)))


def test_decorated_forward_with_kwargs_grows():
    """Why transformers models fail before any of their own code runs: torch.fx unwraps the decorator to
    count the arguments, then patches the wrapper's code object with that count ("co_varnames is too
    small"), and autogrow reports it as data-dependent control flow."""
    torch.manual_seed(0)
    model, x = DecoratedForward().double(), torch.randn(3, 4, dtype=torch.float64)
    before = model(x)
    try:
        autogrow.widen(model, "fc1", 16, example_inputs=x, generator=0)
    except autogrow.AutogrowError as e:
        if "co_varnames" in str(e):
            pytest.xfail("torch.fx cannot trace a functools.wraps-decorated forward with **kwargs, and the "
                         f"refusal blames data-dependent control flow: {e}")
        raise
    assert (model(x) - before).abs().max() < 1e-9


class LayerNorm2d(nn.LayerNorm):
    """timm's ``LayerNorm2d``, reduced: an ``nn.LayerNorm`` subclass that normalises the channels (axis 1)
    of an NCHW tensor."""

    def forward(self, x):
        x = F.layer_norm(x.permute(0, 2, 3, 1), self.normalized_shape, self.weight, self.bias, self.eps)
        return x.permute(0, 3, 1, 2)


class LinearOverWidth(nn.Module):
    """A Linear over the last axis (W) of an NCHW tensor, then LayerNorm2d over its channels, C == W == 4."""

    def __init__(self) -> None:
        super().__init__()
        self.fc, self.norm, self.out = nn.Linear(4, 4), LayerNorm2d(4), nn.Linear(4, 2)

    def forward(self, x):
        return self.out(self.norm(self.fc(x)))


def test_layer_norm_subclass_on_channels():
    """A subclass of a registered type inherits its spec: autogrow takes timm's LayerNorm2d for a LayerNorm
    over the last axis. In ConvNeXt that only makes a refusal name the wrong axis; where the widened units
    are on the last axis and their count equals the channels', the norm's entries are widened and the
    forward breaks (without example inputs nothing verifies the growth)."""
    torch.manual_seed(0)
    model, x = LinearOverWidth().double(), torch.randn(2, 4, 3, 4, dtype=torch.float64)
    before = model(x)
    try:
        autogrow.widen(model, "fc", 8, generator=0)
    except autogrow.AutogrowError:
        return  # refusing is right
    try:
        after = model(x)
    except RuntimeError as e:
        pytest.xfail(f"an nn.LayerNorm subclass over another axis was widened as a LayerNorm over the units; "
                     f"the grown model's forward raises: {e}")
    assert max_rel_error(before, after) < 1e-9


def test_gemma_d_model_grows_in_float32_once_its_norm_says_where_it_is_dark():
    """Gemma's RMSNorm computes ``x * (1 + weight)`` (in float32): registered with its neutral weight (0) and its
    dark one (-1), and its scaled embedding as the ``nn.Embedding`` it is, d_model grows by mixtures through the
    tied embedding and output layer, the final norm's new entries dark. In float32, within its tolerance (the zoo's
    float64 check sees the norm's float32 arithmetic, so the zoo leaves Gemma unregistered)."""
    from dataclasses import replace

    from transformers.models.gemma.modeling_gemma import GemmaRMSNorm, GemmaTextScaledWordEmbedding

    from autogrow import registry

    registry.register_channelwise(GemmaRMSNorm, replace(registry.channel_spec(nn.RMSNorm(1)), tensors={"weight": 0.0},
                                                        dark={"weight": -1.0}))
    registry.register_layer(GemmaTextScaledWordEmbedding, registry.layer_spec(nn.Embedding(1, 1)))
    try:
        torch.manual_seed(0)
        model = zoo.Logits(zoo.MODELS["gemma"].build()).float().eval()
        for m in model.modules():
            if isinstance(m, GemmaRMSNorm):
                nn.init.uniform_(m.weight, -0.5, 0.5)  # not the neutral 0: the new entries' values are what is tested
        x = zoo._tokens(torch.Generator().manual_seed(0))
        with torch.no_grad():
            ref = model(x)
        plan = autogrow.plan_widen(model, "model.model.embed_tokens", 64, init="auto", generator=0, example_inputs=x)
        assert plan.init == "mix"
        plan.apply()
        lm = model.model
        assert lm.lm_head.weight is lm.model.embed_tokens.weight and lm.lm_head.in_features == 64
        assert torch.equal(lm.model.norm.weight[32:], -torch.ones(32))
        with torch.no_grad():
            assert max_rel_error(ref, model(x)) <= 1e-5
    finally:
        registry._CHANNELWISE.pop(GemmaRMSNorm), registry._WEIGHTED.pop(GemmaTextScaledWordEmbedding)
