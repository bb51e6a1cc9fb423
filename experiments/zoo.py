"""The model zoo: every weighted layer of the models people actually train, widened and deepened.

Model definitions from torchvision (ResNet-18, MobileNetV3 small), timm (ViT tiny, ConvNeXt atto),
Hugging Face transformers (GPT-2, BERT, Llama) and torch's own ``nn.TransformerEncoder``, each built from a
small config with random weights (no download), in float64 on a small batch. For every weighted layer (every
module holding a ``weight`` of rank >= 2: Linear, ConvNd, Embedding, transformers' Conv1D...) and every operation
(``widen x2``, ``widen +1``, ``deepen``), on a fresh copy with an Adam optimizer that has taken one step:

* ``exact``: no error, the output is unchanged (<= 1e-9 relative) on the batch it was planned on and on another
  one, every parameter is in the optimizer and a training step with Adam runs;
* ``refused``: an ``AutogrowError``, with the model and optimizer byte-identical;
* ``silently wrong`` / ``broken`` / ``foreign exception`` / ``dirty refusal``: failures.

It also records whether torch.fx can trace each model at all (and, for transformers, a thin wrapper
``forward(input_ids) -> model(input_ids=input_ids).logits``); the transformers models do not, so autogrow traces
what their forward runs on the batch (:mod:`autogrow.capture`), and their MLP blocks are swept on their own too
(``gpt2_mlp``, ``bert_ffn``, ``llama_mlp``). It writes
``experiments/results/zoo.md`` (about 4 minutes on 2 CPU cores):

    python -m autogrow.experiments.zoo [--models resnet18 vit_tiny] [--out path.md] [--json raw.json] [--verbose]

Needs ``torchvision``, ``timm`` and ``transformers``. A CUDA build of torchvision cannot register its
C++ ops next to a CPU torch (``operator torchvision::nms does not exist``); :func:`import_torchvision`
then imports its Python model definitions without those ops (they are not needed here).
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import importlib
import json
import re
import sys
import time
import traceback
import types
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
from torch.utils._pytree import tree_leaves

import autogrow
from autogrow.errors import NeedsShapes
from autogrow.registry import LayerSpec, channel_spec, layer_spec, register_channelwise, register_layer
from autogrow.shapes import as_args, eval_mode
from autogrow.trace import trace

__all__ = ["BAD", "MODELS", "OPS", "FeedForward", "Logits", "ModelSpec", "Outcome", "TokenEncoder", "assert_unchanged",
           "build", "import_torchvision", "report", "run_op", "snapshot", "sweep", "tracing", "weighted_layers"]

OPS = ("widen x2", "widen +1", "deepen")
BAD = ("silently wrong", "broken", "foreign exception", "dirty refusal")
TOLERANCE = 1e-9  # relative change of the output an exact growth may cause (float64)
VOCAB, SEQ, BATCH = 50, 8, 2


def import_torchvision() -> types.ModuleType:
    """``import torchvision``; with a CUDA torchvision next to a CPU torch, import it without its C++ ops.

    The first import fails while registering fake kernels for ``torchvision::nms``. The half-imported
    modules are dropped, the two modules that register those kernels are replaced by empty ones, and
    the import is repeated: the model definitions work, the detection ops (nms, roi_align) do not.
    """
    try:
        return importlib.import_module("torchvision")
    except RuntimeError as e:
        if "torchvision::" not in str(e):
            raise
    for name in [n for n in sys.modules if n == "torchvision" or n.startswith("torchvision.")]:
        del sys.modules[name]
    for name in ("torchvision._meta_registrations", "torchvision._autograd_registrations"):
        sys.modules[name] = types.ModuleType(name)
    return importlib.import_module("torchvision")


# --- the models ---------------------------------------------------------------------------------------

@dataclass(frozen=True)
class ModelSpec:
    """One zoo model: how to build it (random weights, small config) and what to feed it."""

    name: str
    library: str
    build: Callable[[], nn.Module]
    inputs: Callable[[torch.Generator], Any]
    note: str = ""
    part: bool = False  # a block taken out of a model that does not trace as a whole


def _images(gen: torch.Generator) -> torch.Tensor:
    return torch.randn(BATCH, 3, 32, 32, generator=gen, dtype=torch.float64)


def _tokens(gen: torch.Generator) -> torch.Tensor:
    return torch.randint(0, VOCAB, (BATCH, SEQ), generator=gen)


def _hidden(gen: torch.Generator) -> torch.Tensor:
    return torch.randn(BATCH, SEQ, 32, generator=gen, dtype=torch.float64)


def _resnet18() -> nn.Module:
    return import_torchvision().models.resnet18(num_classes=10)


def _resnext() -> nn.Module:
    tv = import_torchvision().models.resnet
    return tv.ResNet(tv.Bottleneck, [1, 1, 1, 1], groups=4, width_per_group=4, num_classes=10)


def _mobilenet_v3_small() -> nn.Module:
    return import_torchvision().models.mobilenet_v3_small(num_classes=10)


def _timm_norms() -> None:
    """timm's ``LayerNorm`` and ``LayerNorm2d`` compute ``nn.LayerNorm`` (over the last axis; over the channels)
    with forwards of their own, so autogrow does not take them for it: registered here, as a timm user would."""
    import timm.layers

    spec = channel_spec(nn.LayerNorm(1))
    assert spec is not None
    register_channelwise(timm.layers.LayerNorm, spec)
    register_channelwise(timm.layers.LayerNorm2d, dataclasses.replace(spec, dims=(1,)))


def _vit_tiny() -> nn.Module:
    import_torchvision()
    import timm

    _timm_norms()

    return timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=10, img_size=32, patch_size=8,
                             depth=2)


def _convnext_atto() -> nn.Module:
    import_torchvision()
    import timm

    _timm_norms()

    # ls_init_value=1: the blocks' LayerScale starts at 1, not 1e-6, so that a wrong block shows in the output.
    return timm.create_model("convnext_atto", pretrained=False, num_classes=10, dims=(16, 24, 32, 40),
                             depths=(1, 1, 2, 1), ls_init_value=1.0)


def _transformers() -> types.ModuleType:
    import_torchvision()
    import transformers

    transformers.logging.set_verbosity_error()
    return transformers


def _conv1d_identity(m: nn.Module, kernel_size: int | None) -> nn.Module:
    with torch.device("meta"):  # no draw from the global RNG for weights that are overwritten
        new = type(m)(m.nf, m.nf)
    new = new.to_empty(device=m.weight.device).to(m.weight.dtype)
    with torch.no_grad():
        new.weight.copy_(torch.eye(m.nf, dtype=m.weight.dtype, device=m.weight.device))
        new.bias.zero_()
    return new


def _hf_conv1d() -> None:
    """transformers' ``Conv1D`` (GPT-2) is a ``Linear`` whose weight is stored (in, out), with its sizes in ``nx``
    and ``nf``: registered here, as a GPT-2 user would, so that autogrow widens and deepens after it."""
    from transformers.pytorch_utils import Conv1D

    register_layer(Conv1D, LayerSpec({"weight": 1, "bias": 0}, {"weight": 0}, "nf", "nx", -1, -1,
                                     identity=_conv1d_identity))


def _gpt2() -> nn.Module:
    t = _transformers()
    _hf_conv1d()
    return t.GPT2LMHeadModel(t.GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=VOCAB, n_positions=16,
                                          bos_token_id=0, eos_token_id=0))


def _bert() -> nn.Module:
    t = _transformers()
    return t.BertForSequenceClassification(t.BertConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2,
                                                        num_attention_heads=2, intermediate_size=64,
                                                        max_position_embeddings=16, num_labels=3))


def _gqa_lm(model: type, config: type, rms_norm: type | None, **extra: Any) -> nn.Module:
    """A Llama-shaped causal LM (4 query heads over 2 key/value heads, RMSNorm, rotary, SwiGLU) of one transformers
    family, its RMSNorm class registered as the ``nn.RMSNorm`` it computes (its forward is its own), as a user
    would (``None``: a norm that is not one, left unregistered); ``extra``: more config values."""
    if rms_norm is not None:
        register_channelwise(rms_norm, channel_spec(nn.RMSNorm(1)))
    return model(config(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=16, bos_token_id=0,
                        eos_token_id=0, pad_token_id=0, **extra))


def _llama() -> nn.Module:
    t = _transformers()
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    return _gqa_lm(t.LlamaForCausalLM, t.LlamaConfig, LlamaRMSNorm)


def _gpt_neox() -> nn.Module:
    t = _transformers()
    return t.GPTNeoXForCausalLM(t.GPTNeoXConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64,
                                                num_hidden_layers=2, num_attention_heads=4, rotary_pct=0.5,
                                                max_position_embeddings=16, bos_token_id=0, eos_token_id=0))


def _qwen2() -> nn.Module:
    t = _transformers()
    from transformers.models.qwen2.modeling_qwen2 import Qwen2RMSNorm

    return _gqa_lm(t.Qwen2ForCausalLM, t.Qwen2Config, Qwen2RMSNorm)


def _qwen3() -> nn.Module:
    t = _transformers()
    from transformers.models.qwen3.modeling_qwen3 import Qwen3RMSNorm

    return _gqa_lm(t.Qwen3ForCausalLM, t.Qwen3Config, Qwen3RMSNorm, head_dim=8)  # its default head size is 128


def _phi3() -> nn.Module:
    t = _transformers()
    from transformers.models.phi3.modeling_phi3 import Phi3RMSNorm

    return _gqa_lm(t.Phi3ForCausalLM, t.Phi3Config, Phi3RMSNorm)


def _opt() -> nn.Module:
    t = _transformers()
    from transformers.models.opt.modeling_opt import OPTLearnedPositionalEmbedding

    # an nn.Embedding with a forward of its own (positions from the attention mask, offset by 2): registered as
    # the Embedding it is, as an OPT user would, so that its width follows d_model
    register_layer(OPTLearnedPositionalEmbedding, layer_spec(nn.Embedding(1, 1)))  # type: ignore[arg-type]
    return t.OPTForCausalLM(t.OPTConfig(vocab_size=VOCAB, hidden_size=32, ffn_dim=64, num_hidden_layers=2,
                                        num_attention_heads=4, max_position_embeddings=16, word_embed_proj_dim=32,
                                        bos_token_id=0, eos_token_id=0, pad_token_id=0))


def _falcon() -> nn.Module:
    t = _transformers()
    from transformers.models.falcon.modeling_falcon import FalconLinear

    # a Linear whose forward is its own (weight.T in a matmul): registered as the Linear it is, as a Falcon user would
    register_layer(FalconLinear, layer_spec(nn.Linear(1, 1)))  # type: ignore[arg-type]
    return t.FalconForCausalLM(t.FalconConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2,
                                              num_attention_heads=4, num_kv_heads=2, new_decoder_architecture=True,
                                              max_position_embeddings=16, bos_token_id=0, eos_token_id=0))


def _gpt_bigcode(attention: str = "sdpa") -> nn.Module:
    t = _transformers()
    return t.GPTBigCodeForCausalLM(t.GPTBigCodeConfig(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=16,
                                                      multi_query=True, bos_token_id=0, eos_token_id=0,
                                                      attn_implementation=attention))


def _gptj() -> nn.Module:
    t = _transformers()
    return t.GPTJForCausalLM(t.GPTJConfig(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, rotary_dim=4,
                                          n_positions=16, bos_token_id=0, eos_token_id=0))


def _phi() -> nn.Module:
    t = _transformers()
    return t.PhiForCausalLM(t.PhiConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                        num_attention_heads=4, max_position_embeddings=16, bos_token_id=0,
                                        eos_token_id=0, pad_token_id=0))


def _olmo2() -> nn.Module:
    t = _transformers()
    from transformers.models.olmo2.modeling_olmo2 import Olmo2RMSNorm

    return _gqa_lm(t.Olmo2ForCausalLM, t.Olmo2Config, Olmo2RMSNorm)


def _gemma() -> nn.Module:
    t = _transformers()
    # GemmaRMSNorm computes x * (1 + weight), not nn.RMSNorm: left unregistered, as a user cannot register it as one
    return _gqa_lm(t.GemmaForCausalLM, t.GemmaConfig, None, head_dim=8)


def _mistral() -> nn.Module:
    t = _transformers()
    from transformers.models.mistral.modeling_mistral import MistralRMSNorm

    return _gqa_lm(t.MistralForCausalLM, t.MistralConfig, MistralRMSNorm)


def _stablelm() -> nn.Module:
    t = _transformers()
    return _gqa_lm(t.StableLmForCausalLM, t.StableLmConfig, None)  # nn.LayerNorm: nothing to register


def _roberta() -> nn.Module:
    t = _transformers()
    return t.RobertaForSequenceClassification(t.RobertaConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2,
                                                              num_attention_heads=4, intermediate_size=64,
                                                              max_position_embeddings=24, pad_token_id=1))


def _bloom() -> nn.Module:
    t = _transformers()
    return t.BloomForCausalLM(t.BloomConfig(vocab_size=VOCAB, hidden_size=32, n_layer=2, n_head=4, bos_token_id=0,
                                            eos_token_id=0, pad_token_id=0))


def _gpt_neo() -> nn.Module:
    t = _transformers()
    return t.GPTNeoForCausalLM(t.GPTNeoConfig(vocab_size=VOCAB, hidden_size=32, num_layers=2, num_heads=4,
                                              attention_types=[[["global", "local"], 1]], window_size=8,
                                              max_position_embeddings=16, bos_token_id=0, eos_token_id=0))


def _distilbert() -> nn.Module:
    t = _transformers()
    return t.DistilBertForSequenceClassification(t.DistilBertConfig(vocab_size=VOCAB, dim=32, n_layers=2, n_heads=4,
                                                                    hidden_dim=64, max_position_embeddings=16,
                                                                    num_labels=3, pad_token_id=0))


class FeedForward(nn.Module):
    """A BERT layer's feed-forward half, as its ``feed_forward_chunk`` runs it: ``output(intermediate(x), x)``."""

    def __init__(self, intermediate: nn.Module, output: nn.Module) -> None:
        super().__init__()
        self.intermediate, self.output = intermediate, output

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.output(self.intermediate(x), x)


def _gpt2_mlp() -> nn.Module:
    return _gpt2().transformer.h[0].mlp


def _bert_ffn() -> nn.Module:
    layer = _bert().bert.encoder.layer[0]
    return FeedForward(layer.intermediate, layer.output)


def _llama_mlp() -> nn.Module:
    return _llama().model.layers[0].mlp


class TokenEncoder(nn.Module):
    """torch's own layers: token ids -> ``nn.Embedding`` -> ``nn.TransformerEncoder`` (2 pre-norm layers of 4 heads,
    a final LayerNorm) -> ``nn.Linear``; with ``unfuse``, its ``nn.MultiheadAttention``s rebuilt from Linears by
    ``autogrow.unfuse_attention`` (as a user would, before the optimizer)."""

    def __init__(self, unfuse: bool) -> None:
        super().__init__()
        layer = nn.TransformerEncoderLayer(32, 4, 64, dropout=0.0, batch_first=True, norm_first=True)
        self.emb, self.head = nn.Embedding(VOCAB, 32), nn.Linear(32, VOCAB)
        self.enc = nn.TransformerEncoder(layer, 2, norm=nn.LayerNorm(32), enable_nested_tensor=False)
        if unfuse:
            autogrow.unfuse_attention(self)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.head(self.enc(self.emb(ids)))


MODELS: dict[str, ModelSpec] = {s.name: s for s in (
    ModelSpec("resnet18", "torchvision", _resnet18, _images, "resnet18(num_classes=10), 32x32 input"),
    ModelSpec("resnext", "torchvision", _resnext, _images,
              "ResNet(Bottleneck, [1, 1, 1, 1], groups=4, width_per_group=4, num_classes=10), 32x32 input: "
              "grouped 3x3 convs (ResNeXt)"),
    ModelSpec("mobilenet_v3_small", "torchvision", _mobilenet_v3_small, _images,
              "mobilenet_v3_small(num_classes=10), 32x32 input: depthwise convs, squeeze-excitation, hardswish"),
    ModelSpec("vit_tiny", "timm", _vit_tiny, _images,
              "vit_tiny_patch16_224(img_size=32, patch_size=8, depth=2, num_classes=10): fused qkv, cls token"),
    ModelSpec("convnext_atto", "timm", _convnext_atto, _images,
              "convnext_atto(dims=(16, 24, 32, 40), depths=(1, 1, 2, 1), ls_init_value=1, num_classes=10): "
              "depthwise 7x7, LayerNorm2d, 1x1-conv MLP, LayerScale"),
    ModelSpec("gpt2", "transformers", _gpt2, _tokens,
              "GPT2LMHeadModel(n_layer=2, n_embd=32, n_head=2, vocab_size=50): Conv1D, tied lm_head"),
    ModelSpec("bert", "transformers", _bert, _tokens,
              "BertForSequenceClassification(hidden_size=32, 2 layers, 2 heads, intermediate_size=64)"),
    ModelSpec("llama", "transformers", _llama, _tokens,
              "LlamaForCausalLM(hidden_size=32, 2 layers, 4 heads, 2 kv heads): RMSNorm, rotary, SwiGLU"),
    ModelSpec("gpt_neox", "transformers", _gpt_neox, _tokens,
              "GPTNeoXForCausalLM (Pythia's architecture; hidden_size=32, 2 layers, 4 heads, rotary_pct=0.5): fused "
              "qkv viewed per head, parallel attention and MLP"),
    ModelSpec("qwen2", "transformers", _qwen2, _tokens,
              "Qwen2ForCausalLM(hidden_size=32, 2 layers, 4 heads, 2 kv heads): biases on q/k/v, RMSNorm, rotary"),
    ModelSpec("qwen3", "transformers", _qwen3, _tokens,
              "Qwen3ForCausalLM(hidden_size=32, 2 layers, 4 heads, 2 kv heads, head_dim=8): q and k normalised per "
              "head (q_norm, k_norm), RMSNorm, rotary"),
    ModelSpec("phi3", "transformers", _phi3, _tokens,
              "Phi3ForCausalLM(hidden_size=32, 2 layers, 4 heads, 2 kv heads): fused qkv_proj sliced at offsets, "
              "fused gate_up_proj"),
    ModelSpec("opt", "transformers", _opt, _tokens,
              "OPTForCausalLM(hidden_size=32, 2 layers, 4 heads, ffn_dim=64): learned positions, tied lm_head"),
    ModelSpec("falcon", "transformers", _falcon, _tokens,
              "FalconForCausalLM(hidden_size=32, 2 layers, 4 heads, 2 kv heads, new_decoder_architecture): fused qkv "
              "viewed as (kv heads, group + 2, head size), parallel attention and MLP, tied lm_head"),
    ModelSpec("olmo2", "transformers", _olmo2, _tokens,
              "Olmo2ForCausalLM(hidden_size=32, 2 layers, 4 heads, 2 kv heads): q and k normalised over the whole "
              "projection, norms after attention and MLP (no pre-norm)"),
    ModelSpec("gemma", "transformers", _gemma, _tokens,
              "GemmaForCausalLM(hidden_size=32, 2 layers, 4 heads, 2 kv heads, head_dim=8): its RMSNorm computes "
              "x * (1 + weight), unregistered; embeddings scaled by sqrt(hidden_size)"),
    ModelSpec("gpt_bigcode", "transformers", _gpt_bigcode, _tokens,
              "GPTBigCodeForCausalLM (StarCoder's architecture; n_embd=32, 2 layers, 4 heads, multi_query=True): "
              "fused c_attn split into query, one key head, one value head; tied lm_head"),
    ModelSpec("gpt_bigcode_eager", "transformers", lambda: _gpt_bigcode("eager"), _tokens,
              "the same model with attn_implementation='eager', whose repeat_kv reads num_key_value_groups"),
    ModelSpec("gptj", "transformers", _gptj, _tokens,
              "GPTJForCausalLM(n_embd=32, 2 layers, 4 heads, rotary_dim=4): interleaved rotary on part of each head, "
              "parallel attention and MLP"),
    ModelSpec("phi", "transformers", _phi, _tokens,
              "PhiForCausalLM (Phi-1/2; hidden_size=32, 2 layers, 4 heads): partial rotary, parallel attention and "
              "MLP, biases"),
    ModelSpec("mistral", "transformers", _mistral, _tokens,
              "MistralForCausalLM(hidden_size=32, 2 layers, 4 heads, 2 kv heads): as Llama, sliding-window attention"),
    ModelSpec("stablelm", "transformers", _stablelm, _tokens,
              "StableLmForCausalLM(hidden_size=32, 2 layers, 4 heads, 2 kv heads): nn.LayerNorm, rotary on a quarter "
              "of each head"),
    ModelSpec("roberta", "transformers", _roberta, _tokens,
              "RobertaForSequenceClassification(hidden_size=32, 2 layers, 4 heads, intermediate_size=64)"),
    ModelSpec("bloom", "transformers", _bloom, _tokens,
              "BloomForCausalLM(hidden_size=32, 2 layers, 4 heads): ALiBi added by baddbmm, fused qkv per head, tied "
              "lm_head"),
    ModelSpec("gpt_neo", "transformers", _gpt_neo, _tokens,
              "GPTNeoForCausalLM(hidden_size=32, 2 layers, 4 heads): a global and a local (windowed) attention layer, "
              "masked with torch.where; tied lm_head"),
    ModelSpec("distilbert", "transformers", _distilbert, _tokens,
              "DistilBertForSequenceClassification(dim=32, 2 layers, 4 heads, hidden_dim=64)"),
    ModelSpec("torch_encoder", "torch", lambda: TokenEncoder(unfuse=True), _tokens,
              "nn.Embedding, nn.TransformerEncoder (2 pre-norm layers, 4 heads, d_model 32, FFN 64, final LayerNorm), "
              "nn.Linear; attention unfused by autogrow.unfuse_attention"),
    ModelSpec("torch_encoder_fused", "torch", lambda: TokenEncoder(unfuse=False), _tokens,
              "the same model with its nn.MultiheadAttention left as it is"),
    # The whole transformers models do not trace; their MLP blocks do, on hidden states (B, T, 32):
    ModelSpec("gpt2_mlp", "transformers", _gpt2_mlp, _hidden,
              "GPT-2's first block's MLP (GPT2MLP: Conv1D c_fc, gelu_new, Conv1D c_proj), on its own", part=True),
    ModelSpec("bert_ffn", "transformers", _bert_ffn, _hidden,
              "BERT's first layer's feed-forward (BertIntermediate: dense + GELU; BertOutput: dense, dropout, "
              "residual, LayerNorm), on its own", part=True),
    ModelSpec("llama_mlp", "transformers", _llama_mlp, _hidden,
              "Llama's first layer's MLP (LlamaMLP: down(silu(gate(x)) * up(x))), on its own", part=True),
)}


class Logits(nn.Module):
    """The usual thin wrapper around a transformers model: ``input_ids -> logits``."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=input_ids).logits


@contextmanager
def _seeded(seed: int) -> Iterator[None]:
    """The global RNG seeded inside, restored after (model constructors draw from it)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def build(spec: ModelSpec, seed: int = 0) -> tuple[nn.Module, Any]:
    """``spec``'s model in float64 with seeded random weights, and its example inputs.

    One-dimensional parameters (biases, normalisation weights, LayerScale) and BatchNorm statistics are
    randomised too: at their initial values (0, 1) a unit copied from the wrong place would not show.
    """
    with _seeded(seed):
        model = spec.build().to(torch.float64)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 1 and p.is_floating_point():
                p.add_(0.2 * torch.randn(p.shape, generator=gen, dtype=p.dtype))
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.running_mean is not None:
                m.running_mean.copy_(0.1 * torch.randn(m.running_mean.shape, generator=gen, dtype=torch.float64))
                m.running_var.copy_(torch.rand(m.running_var.shape, generator=gen, dtype=torch.float64) + 0.5)
    return model.train(), spec.inputs(gen)


def weighted_layers(model: nn.Module) -> list[str]:
    """Every module that holds a ``weight`` Parameter of rank >= 2 itself (Linear, ConvNd, Embedding,
    Conv1D...), registered with autogrow or not, in definition order."""
    names = []
    for name, m in model.named_modules():
        w = m._parameters.get("weight")
        if name and isinstance(w, nn.Parameter) and w.dim() >= 2:
            names.append(name)
    return names


def out_width(module: nn.Module) -> int:
    """The number of output units of a weighted layer (registered: its spec; else a guess from the weight)."""
    spec = layer_spec(module)
    if spec is not None:
        return int(getattr(module, spec.out_attr))
    for attr in ("out_features", "out_channels", "embedding_dim", "nf"):
        if isinstance(getattr(module, attr, None), int):
            return int(getattr(module, attr))
    return int(module.weight.shape[0])


# --- one operation ---------------------------------------------------------------------------------------

@dataclass
class Outcome:
    """What one operation on one layer of one model did."""

    model: str
    layer: str
    op: str
    kind: str  # "exact", "refused" or one of BAD
    detail: str = ""  # the refusal message or what went wrong
    needs_shapes: bool = False
    seconds: float = 0.0

    @property
    def pattern(self) -> str:
        """The layer name with its first index (the block's) replaced by ``*``: ``blocks.*.mlp.fc1``,
        ``features.*.block.1.0`` (the position inside a block is kept: it is the layer's role)."""
        return re.sub(r"(?:(?<=\.)|^)\d+(?=\.|$)", "*", self.layer, count=1)


def snapshot(model: nn.Module, opt: torch.optim.Optimizer | None = None) -> tuple:
    """Everything a refusal must leave as it was: architecture, tensors, Parameter identities, optimizer."""
    sd = {k: (v.detach().clone(), v.dtype, v.requires_grad) for k, v in model.state_dict(keep_vars=True).items()}
    state = copy.deepcopy(opt.state_dict()) if opt is not None else None
    return repr(model), sd, [id(p) for p in model.parameters()], state


def assert_unchanged(before: tuple, model: nn.Module, opt: torch.optim.Optimizer | None = None) -> None:
    """Raise ``AssertionError`` naming the first thing that differs from ``before`` (a :func:`snapshot`)."""
    after = snapshot(model, opt)
    assert before[0] == after[0], "the module structure changed"
    assert before[2] == after[2], "the Parameter objects changed"
    assert before[1].keys() == after[1].keys(), "the state_dict keys changed"
    for k, (v, dt, rg) in before[1].items():
        w, dt2, rg2 = after[1][k]
        assert v.shape == w.shape and torch.equal(v, w) and dt == dt2 and rg == rg2, f"{k} changed"
    assert _same_tree(before[3], after[3]), "the optimizer state changed"


def _same_tree(a: Any, b: Any) -> bool:
    """Equal nested containers of tensors and plain values (tensors: same dtype, shape and values)."""
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.dtype == b.dtype
                and a.shape == b.shape and torch.equal(a, b))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same_tree(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(_same_tree(u, v) for u, v in zip(a, b))
    return a == b


def as_tensor(out: Any) -> torch.Tensor:
    """The output a loss is computed on: ``.logits`` of a transformers output, else the first tensor."""
    logits = getattr(out, "logits", None)
    if isinstance(logits, torch.Tensor):
        return logits
    return next(t for t in tree_leaves(out) if isinstance(t, torch.Tensor) and t.is_floating_point())


def outputs(model: nn.Module, x: Any) -> torch.Tensor:
    """The model's output on ``x`` in eval mode (train/eval flags restored), without gradients."""
    with torch.no_grad(), eval_mode(model):
        return as_tensor(model(*as_args(x))).detach().clone()


def train_step(model: nn.Module, opt: torch.optim.Optimizer, x: Any) -> None:
    """One Adam step on ``mean(output ** 2)``; raises on a non-finite loss."""
    opt.zero_grad()
    loss = as_tensor(model(*as_args(x))).pow(2).mean()
    loss.backward()
    opt.step()
    if not bool(torch.isfinite(loss)):
        raise FloatingPointError(f"non-finite loss {float(loss)}")


def prepare(prototype: nn.Module, x: Any) -> tuple[nn.Module, torch.optim.Optimizer]:
    """A fresh copy of ``prototype`` and an Adam optimizer that has taken one step on ``x`` (state to carry)."""
    model = copy.deepcopy(prototype)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    train_step(model, opt, x)
    return model, opt


def grow(model: nn.Module, opt: torch.optim.Optimizer, layer: str, op: str, x: Any) -> autogrow.Growth:
    """Perform ``op`` (one of :data:`OPS`; a widening may end in ``" auto"`` or ``" ramp"``: that initialiser
    instead of Net2WiderNet copies) on ``layer``, verified on ``x``, carrying ``opt``."""
    if op == "deepen":
        return autogrow.deepen(model, layer, residual=None, optimizer=opt, example_inputs=x, generator=0)
    n = out_width(model.get_submodule(layer))
    width = 2 * n if op.startswith("widen x2") else n + 1
    init = op.split()[-1] if op.endswith((" auto", " ramp")) else "net2wider"
    return autogrow.widen(model, layer, width, optimizer=opt, example_inputs=x, generator=0, split=0.3, init=init)


def run_op(spec: ModelSpec, prototype: nn.Module, x: Any, layer: str, op: str,
           snap: Callable[[nn.Module, torch.optim.Optimizer], Any] = snapshot,
           unchanged: Callable[[Any, nn.Module, torch.optim.Optimizer], None] = assert_unchanged) -> Outcome:
    """``op`` on ``layer`` of a fresh copy of ``prototype``, classified (see the module docstring).

    ``snap``/``unchanged`` take and compare the before-state of a refusal (the tests pass their own).
    """
    t0 = time.perf_counter()
    model, opt = prepare(prototype, x)
    ref = outputs(model, x)
    unseen = spec.inputs(torch.Generator().manual_seed(7))  # a batch the growth was neither planned nor checked on
    ref_unseen = outputs(model, unseen)
    before = snap(model, opt)
    params = autogrow.num_params(model)

    def done(kind: str, detail: str = "", needs_shapes: bool = False) -> Outcome:
        return Outcome(spec.name, layer, op, kind, detail, needs_shapes, time.perf_counter() - t0)

    try:
        grow(model, opt, layer, op, x)
    except autogrow.AutogrowError as e:
        try:
            unchanged(before, model, opt)
        except AssertionError as a:
            return done("dirty refusal", f"{e} -- but {a}")
        return done("refused", str(e), isinstance(e, NeedsShapes))
    except Exception as e:  # noqa: BLE001 - classified, not swallowed
        return done("foreign exception", f"{type(e).__name__}: {e}\n{traceback.format_exc()[-1500:]}")
    for batch, want, which in ((x, ref, ""), (unseen, ref_unseen, " on another batch")):
        try:
            out = outputs(model, batch)
        except Exception as e:  # noqa: BLE001
            return done("broken", f"forward{which} raised {type(e).__name__}: {e}")
        if out.shape != want.shape:
            return done("silently wrong", f"output shape{which} {tuple(want.shape)} -> {tuple(out.shape)}")
        err = float((out - want).abs().max() / want.abs().max().clamp_min(1e-30))
        if err > TOLERANCE:
            return done("silently wrong", f"relative error{which} {err:.3g}")
    if autogrow.num_params(model) <= params:
        return done("silently wrong", "reported success but the model did not grow")
    in_opt = {id(p) for g in opt.param_groups for p in g["params"]}
    missing = [n for n, p in model.named_parameters() if id(p) not in in_opt]
    if missing:
        return done("broken", f"parameters not in the optimizer: {missing}")
    try:
        train_step(model, opt, x)
    except Exception as e:  # noqa: BLE001
        return done("broken", f"training step raised {type(e).__name__}: {e}")
    return done("exact")


def tracing(spec: ModelSpec, prototype: nn.Module) -> dict[str, str]:
    """Whether autogrow traces the model (``"ok"`` or the refusal), and for transformers the wrapper too."""
    out = {}
    candidates = {"model": prototype}
    if spec.library == "transformers" and not spec.part:
        candidates["Logits(model)"] = Logits(prototype)
    for what, m in candidates.items():
        try:
            trace(m)
            out[what] = "ok"
        except autogrow.AutogrowError as e:
            out[what] = str(e)
    return out


def sweep(spec: ModelSpec, layers: list[str] | None = None, ops: tuple[str, ...] = OPS, verbose: bool = False
          ) -> list[Outcome]:
    """Every operation in ``ops`` on every layer (default: all :func:`weighted_layers`) of ``spec``'s model."""
    prototype, x = build(spec)
    layers = weighted_layers(prototype) if layers is None else layers
    out = []
    for layer in layers:
        for op in ops:
            out.append(run_op(spec, prototype, x, layer, op))
            if verbose:
                o = out[-1]
                first = o.detail.splitlines()[0][:150] if o.detail else ""
                print(f"  {o.seconds:5.1f} s  {o.kind:8s} {op:8s} {layer}: {first}", flush=True)
    return out


# --- the report ----------------------------------------------------------------------------------------------

def reason(message: str) -> str:
    """A refusal message with names, numbers and shapes blanked out, so that equal causes count together."""
    m = re.sub(r"^target: cannot widen '[^']*' exactly: ", "", message)
    m = re.sub(r"^(after|target): '[^']*' ", r"\1: '…' ", m)
    m = re.sub(r"node '[^']*' \((\w+) ([^):]*)(: (\w+))?\)", lambda g: f"<{g.group(4) or g.group(2)}>", m)
    m = re.sub(r"'[^']*'", "'…'", m)
    # numbers become N, but not the digits of names (Conv2d, GPT2) nor axes ("axis -1", ">= 0", "dim=1")
    m = re.sub(r"(?<![\w.])(?<!axis )(?<!axis -)(?<!>= )(?<!dim=)(?<!dim )\d+(?![\w])", "N", m)
    m = re.sub(r"\((?:N, )*N\)|\[(?:N, )*N\]", "(…)", m)
    m = re.sub(r"(?<=\.)\d+(?=\.)", "*", m)  # block indices in module names
    return m[:300]


def _grows(outs: list[Outcome], op: str) -> str:
    """What ``op`` grows exactly: every layer, nothing, or the layer patterns with their counts."""
    sel = [o for o in outs if o.op == op]
    exact = sum(o.kind == "exact" for o in sel)
    if exact == 0:
        return "nothing"
    if exact == len(sel):
        return f"every layer ({exact})"
    by: dict[str, list[int]] = {}
    for o in sel:
        c = by.setdefault(o.pattern, [0, 0])
        c[0] += o.kind == "exact"
        c[1] += 1
    return f"{exact}/{len(sel)}: " + ", ".join(f"`{p}` ({e}/{n})" for p, (e, n) in by.items() if e)


def _section(name: str, outs: list[Outcome], traces: dict[str, str]) -> list[str]:
    spec = MODELS[name]
    lines = ["", f"## {name} ({spec.library})", "", spec.note, ""]
    for what, msg in traces.items():
        lines.append(f"- torch.fx traces `{what}`: " + ("yes" if msg == "ok" else
                                                         f"**no** (autogrow traces what it runs instead): {msg}"))
    lines += [f"- {op} grows: {_grows(outs, op)}" for op in OPS]
    reasons = Counter(reason(o.detail) for o in outs if o.kind == "refused")
    number = {r: i + 1 for i, (r, _) in enumerate(reasons.most_common())}
    if reasons:
        lines += ["- refusals, most common first:", ""]
        lines += [f"  {number[r]}. ({n}x) {r}" for r, n in reasons.most_common()]
    bad = [o for o in outs if o.kind in BAD]
    lines += [f"- **{o.kind}**: {o.op} `{o.layer}`: {o.detail.splitlines()[0][:300]}" for o in bad]
    cell = {(o.layer, o.op): o for o in outs}
    layers = list(dict.fromkeys(o.layer for o in outs))
    lines += ["", "<details><summary>every layer (R<i>: refusal i above)</summary>", "",
              "| layer | " + " | ".join(OPS) + " |", "|---|" + "---|" * len(OPS)]
    for layer in layers:
        marks = []
        for op in OPS:
            o = cell.get((layer, op))
            marks.append("" if o is None else "exact" if o.kind == "exact" else
                         f"R{number[reason(o.detail)]}" if o.kind == "refused" else f"**{o.kind}**")
        lines.append(f"| `{layer}` | " + " | ".join(marks) + " |")
    return lines + ["", "</details>"]


def report(results: dict[str, list[Outcome]], traces: dict[str, dict[str, str]], seconds: float) -> str:
    """The markdown of ``experiments/results/zoo.md``."""
    kinds = ["exact", "refused", *BAD]
    lines = ["# The model zoo: what grows", "",
             "Every weighted layer of each model, widened to twice its units (`widen x2`), by one unit "
             "(`widen +1`) and deepened after (`deepen`, `residual=None`), each on a fresh copy with example "
             "inputs and an Adam optimizer that has taken a step. `exact`: output unchanged to 1e-9 (float64), "
             "every parameter in the optimizer and a training step runs; `refused`: `AutogrowError` with model "
             "and optimizer byte-identical; anything else is a failure. Reproduce: "
             "`python -m autogrow.experiments.zoo` (tests: `tests/test_zoo.py` runs a sample).", "",
             "| model | library | layers | op | " + " | ".join(kinds) + " |",
             "|---|---|---|---|" + "---|" * len(kinds)]
    for name, outs in results.items():
        n_layers = len({o.layer for o in outs})
        for op in OPS:
            c = Counter(o.kind for o in outs if o.op == op)
            lines.append(f"| {name} | {MODELS[name].library} | {n_layers} | {op} | "
                         + " | ".join(str(c[k]) for k in kinds) + " |")
    for name, outs in results.items():
        lines += _section(name, outs, traces.get(name, {}))
    lines += ["", f"_{sum(len(o) for o in results.values())} operations in {seconds:.0f} s; measured "
              f"{time.strftime('%Y-%m-%d')}, torch {torch.__version__}{_versions()}._"]
    return "\n".join(lines) + "\n"


def _versions() -> str:
    out = ""
    for pkg in ("torchvision", "timm", "transformers"):
        mod = sys.modules.get(pkg)
        if mod is not None:
            out += f", {pkg} {getattr(mod, '__version__', '?')}"
    return out


def main(argv: list[str] | None = None) -> dict[str, Counter]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="*", default=list(MODELS), choices=list(MODELS))
    ap.add_argument("--out", default=None, help="markdown report (default experiments/results/zoo.md)")
    ap.add_argument("--json", default=None, help="also write every outcome to this JSON file")
    ap.add_argument("--load", default=None, help="render the report from a --json file instead of running")
    ap.add_argument("--verbose", action="store_true", help="print every operation as it finishes")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)  # small tensors; two threads spin against other processes on a shared machine
    t0 = time.perf_counter()
    if args.load:
        saved = json.loads(Path(args.load).read_text())
        results = {m: [Outcome(**o) for o in outs] for m, outs in saved["results"].items()}
        traces, seconds = saved["traces"], saved["seconds"]
        for name in results:
            build(MODELS[name])  # imports the libraries, for the versions line
    else:
        results, traces = {}, {}
        for name in args.models:
            spec = MODELS[name]
            t1 = time.perf_counter()
            prototype, _ = build(spec)
            traces[name] = tracing(spec, prototype)
            results[name] = sweep(spec, verbose=args.verbose)
            print(f"{name}: {dict(Counter(o.kind for o in results[name]))} ({time.perf_counter() - t1:.0f} s)",
                  flush=True)
        seconds = time.perf_counter() - t0
    if args.json:
        Path(args.json).write_text(json.dumps({"results": {m: [asdict(o) for o in outs] for m, outs in results.items()},
                                               "traces": traces, "seconds": seconds}, indent=1))
    text = report(results, traces, seconds)
    out = Path(args.out or Path(__file__).parent / "results" / "zoo.md")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    print(text)
    return {name: Counter(o.kind for o in outs) for name, outs in results.items()}


if __name__ == "__main__":
    main()
