"""Models torch.fx cannot trace grow from the graph of what their forward ran on the example inputs."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

import autogrow
from autogrow.capture import capture
from autogrow.optim import optimizer_holds_model
from tests.models import max_rel_error
from tests.test_refusals import assert_unchanged, snapshot

pytestmark = pytest.mark.usefixtures("float64")


class Branchy(nn.Module):
    """Python control flow on a tensor's value (fx cannot trace it) and sizes read from the widened tensor."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2, self.head = nn.Linear(4, 6), nn.Linear(6, 6), nn.Linear(6, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if bool(x.sum() < -1e9):  # never taken on these inputs
            x = -x
        h = torch.relu(self.fc1(x))
        b, t, c = h.shape
        z = self.fc2(h.reshape(b * t, c))  # sizes read from the widened tensors
        return self.head(z.view(b, t, z.size(-1)).mean(1))


def test_a_model_fx_cannot_trace_grows_from_what_ran():
    model, x = Branchy(), torch.randn(2, 5, 4)
    other = torch.randn(3, 7, 4)
    ref, ref_other = model(x), model(other)
    with pytest.warns(UserWarning, match=r"traced what its forward ran on example_inputs"):
        autogrow.widen(model, "fc1", 9, generator=0, example_inputs=x)
    assert max_rel_error(ref, model(x)) <= 1e-9 and max_rel_error(ref_other, model(other)) <= 1e-9
    with pytest.warns(UserWarning):
        autogrow.widen(model, "fc2", 12, init="zero_out", generator=1, example_inputs=x)  # view(b, t, z.size(-1))
        autogrow.deepen(model, "fc1", generator=2, example_inputs=x)
    assert max_rel_error(ref_other, model(other)) <= 1e-9 and model.fc2.out_features == 12


def test_sizes_read_in_a_captured_forward_remember_their_nodes():
    graph, shapes = capture(Branchy(), torch.randn(2, 5, 4))
    view = next(n for n in graph.nodes if n.op == "call_method" and n.target == "view")
    # b and t from h.shape (getitem nodes), c from h.size(-1): nodes, not the literals 2, 5, 6
    assert [a.op for a in view.args[1:]] == ["call_function", "call_function", "call_method"]
    assert shapes[view] == (2, 5, 6)


def test_without_example_inputs_the_refusal_says_to_pass_them():
    model = Branchy()
    before = snapshot(model)
    with pytest.raises(autogrow.AutogrowError, match=r"could not trace Branchy.*Or pass example_inputs"):
        autogrow.widen(model, "fc1", 9)
    assert_unchanged(before, model)


class BranchOnWidened(nn.Module):
    """The branch reads the widened tensor: after growth it could go the other way, so the use is refused."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(4, 6), nn.Linear(6, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.fc1(x))
        return self.fc2(-h if bool(h.sum() < 0) else h)


def test_the_callback_grows_a_hugging_face_gpt2_it_cannot_trace_with_fx(tmp_path):
    """A real fit of transformers' GPT-2 (its Conv1D registered, as the zoo does): the callback's default Widen()
    finds what grows from the probe batch's run, both MLPs, the heads (GPT-2 splits its fused q/k/v by
    ``self.split_size``, which the growth rewrites: autogrow.bound) and d_model (its embedding tied to ``lm_head``)
    widen exactly, and the checkpoint loads."""
    pytest.importorskip("transformers")
    from autogrow.experiments import zoo

    from autogrow.checkpoint import history_of
    from tests.test_transformers import TinyLM, fit_one_growth, reloaded

    def gpt2() -> nn.Module:
        return zoo.Logits(zoo._gpt2())  # input_ids -> logits, as a user wraps it

    with pytest.warns(UserWarning, match="traced what its forward ran"):
        model, grow, trainer, seq = fit_one_growth(lambda: TinyLM(arch=gpt2), vocab=zoo.VOCAB)
    (event,) = grow.events
    gpt = model.net.model
    assert sorted(c.target for c in event.changes) == [
        *(f"net.model.transformer.h.{i}.{layer}" for i in (0, 1) for layer in ("attn.c_attn", "mlp.c_fc")),
        "net.model.transformer.wte"]
    assert event.preservation_error < 1e-5 and gpt.transformer.h[0].mlp.c_fc.nf == 256
    # 2 -> 4 heads of 16: the q/k/v split and the attribute it reads grew together
    assert gpt.transformer.h[1].attn.c_attn.nf == 192 and gpt.transformer.h[1].attn.split_size == 64
    assert type(gpt.transformer.h[1].attn.split_size) is int
    # d_model 32 -> 64 through the tied embedding (autogrow.tied): still one Parameter, held once by the optimizer
    assert gpt.transformer.wte.weight.shape[1] == 64 and gpt.lm_head.weight is gpt.transformer.wte.weight
    # by fresh units that GPT-2's LayerNorms ramp in (the callback's default: 5% of the run, here one step)
    assert {h["options"]["init"] for h in history_of(model) if h["target"].endswith("wte")} == {"ramp"}
    assert optimizer_holds_model(trainer.optimizers[0], model)
    loaded = reloaded(trainer, model, seq, tmp_path, arch=gpt2)
    assert loaded.net.model.transformer.h[1].attn.split_size == 64  # replayed from the growth record


class WritesInPlace(nn.Module):
    """``h[:, 0] = 0`` writes into the widened tensor: a capture records it (and the walk refuses it)."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(4, 6), nn.Linear(6, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if bool(x.sum() < -1e9):
            x = -x
        h = self.fc1(x)
        h[:, 0] = 0.0
        return self.fc2(h)


@pytest.mark.parametrize("net, why", [(BranchOnWidened, r"'sum.*reduces over the units"), (WritesInPlace, r"setitem")])
def test_what_reads_or_writes_the_widened_tensor_outside_layers_is_refused(net, why):
    """A branch on the widened tensor (it could go the other way after growth) and an in-place write into it: both
    are in the captured graph, so the walk refuses them by name (not only the output check, with another message)."""
    model = net()
    before = snapshot(model)
    with pytest.warns(UserWarning), pytest.raises(autogrow.AutogrowError, match=why):
        autogrow.widen(model, "fc1", 9, example_inputs=torch.randn(3, 4))
    assert_unchanged(before, model)
