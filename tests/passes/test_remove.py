"""RemoveOperators / prune: exact on zeroed branches, consistent with the analysis stand-ins, exact parameter
accounting, a golden rewritten graph for conv1x1, and every error path."""

from __future__ import annotations

import contextlib
import copy
import functools
import random

import pytest
import torch
from conftest import make_tiny_sd_unet, make_tiny_unet2d
from torch import nn

from ldpruner.base.errors import PlanError, RewriteError
from ldpruner.compiler.graph import Action, build_operator_graph
from ldpruner.compiler.passmanager import PassManager
from ldpruner.compiler.removal import PROJECTION_ROOT, swapped
from ldpruner.compiler.tracer import trace_unet, unet_example_inputs
from ldpruner.compiler.verify import verify_graph
from ldpruner.passes.plan import PlannedRemoval, RemovalPlan
from ldpruner.passes.remove import RemoveOperators, count_params, projection_key, prune


def plan_for(og, names):
    """A hand-written plan: the named operators with the graph's own actions and predictions."""
    removals = tuple(PlannedRemoval(n, og[n].action.value, og[n].params, og[n].macs, reason="test") for n in names)
    return RemovalPlan(removals, og.traced.model_class, og.traced.granularity.value, og.total_params, og.total_macs)


def run(traced, gm=None):
    with torch.no_grad():
        return (gm or traced.gm)(*[traced.example_inputs[n] for n in traced.input_names])


@functools.cache
def dense(make, granularity):
    """(model, traced, operator graph) of a tiny UNet, shared by the tests: pruning never changes any of them,
    which test_pruned_params_macs_and_shape_match_the_plan_and_the_users_model_is_untouched checks."""
    model = make()
    traced = trace_unet(model, granularity=granularity)
    return model, traced, build_operator_graph(traced)


def zero_(*tensors):
    with torch.no_grad():
        for t in tensors:
            t.zero_()


# --- a UNet that is not diffusers: blocks whose channels change with no shortcut (conv1x1) ---------------------
class Block(nn.Module):
    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, 3, padding=1)
        self.act = nn.SiLU()

    def forward(self, x):
        return self.act(self.conv(x))


class TinyNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv_in = nn.Conv2d(3, 8, 1)
        self.widen = Block(8, 16)  # channels change, no shortcut: conv1x1
        self.same = Block(16, 16)  # identity; its output is used by a skip concat and by the down path
        self.down = nn.AvgPool2d(2)
        self.low = Block(16, 16)
        self.up = nn.Upsample(scale_factor=2)
        self.merge = Block(32, 8)  # reads the concat: conv1x1 32 -> 8
        self.head = Block(8, 3)  # its output is the graph output: conv1x1 8 -> 3

    def forward(self, sample):
        h0 = self.conv_in(sample)
        h1 = self.widen(h0)
        h2 = self.same(h1)
        h3 = self.up(self.low(self.down(h2)))
        h = self.merge(torch.cat([h3, h2], dim=1))
        return self.head(h)


def trace_tiny_net(seed: int = 0):
    torch.manual_seed(seed)
    model = TinyNet().eval()
    traced = trace_unet(model, {"sample": torch.randn(2, 3, 8, 8)}, extra_leaf_types=[Block])
    return model, traced, build_operator_graph(traced, extra_operator_types=[Block])


# --- exactness: an operator whose residual branch is zero is removed without changing the output --------------
def _resnet_branch(m):
    return m.conv2.weight, m.conv2.bias


def _transformer_branch(m):
    return m.proj_out.weight, m.proj_out.bias


def _attention_branch(m):
    return m.to_out[0].weight, m.to_out[0].bias


def _ff_branch(m):
    return m.net[2].weight, m.net[2].bias


EXACT_CASES = {
    "resnet-identity": (make_tiny_sd_unet, {}, "block", ["down_blocks.0.resnets.0", "mid_block.resnets.1"],
                        _resnet_branch, Action.IDENTITY),
    # output_scale_factor 2: the bypass must divide by it (a call_function node in the rewritten graph)
    "resnet-identity-scaled": (make_tiny_sd_unet, {"mid_block_scale_factor": 2.0}, "block",
                               ["mid_block.resnets.0", "mid_block.resnets.1"], _resnet_branch, Action.IDENTITY),
    "resnet-shortcut": (make_tiny_sd_unet, {}, "block", ["down_blocks.1.resnets.0", "up_blocks.0.resnets.0",
                        "up_blocks.1.resnets.1"], _resnet_branch, Action.SHORTCUT),
    "transformer": (make_tiny_sd_unet, {}, "block", ["down_blocks.0.attentions.0", "mid_block.attentions.0",
                    "up_blocks.1.attentions.1"], _transformer_branch, Action.IDENTITY),
    "sublayer-attention": (make_tiny_sd_unet, {}, "sublayer", [
        "down_blocks.0.attentions.0.transformer_blocks.0.attn1",
        "down_blocks.0.attentions.0.transformer_blocks.0.attn2",
        "up_blocks.1.attentions.1.transformer_blocks.0.attn2"], _attention_branch, Action.IDENTITY),
    "sublayer-feed-forward": (make_tiny_sd_unet, {}, "sublayer", [
        "mid_block.attentions.0.transformer_blocks.0.ff",
        "up_blocks.1.attentions.0.transformer_blocks.0.ff"], _ff_branch, Action.IDENTITY),
    "block-attention": (make_tiny_unet2d, {}, "block", ["down_blocks.1.attentions.0", "mid_block.attentions.0"],
                        _attention_branch, Action.IDENTITY),
}


@functools.cache
def zeroed_trace(make, overrides, granularity):
    """One traced model per configuration, with the branches of every case that uses it zeroed (tracing is the
    slow part; pruning never changes the trace, so the cases can share it)."""
    model = make(**dict(overrides))
    for case in EXACT_CASES.values():
        if case[:3] == (make, dict(overrides), granularity):
            for name in case[3]:
                zero_(*case[4](model.get_submodule(name)))
    traced = trace_unet(model, granularity=granularity)
    return traced, build_operator_graph(traced), run(traced)


@pytest.mark.parametrize("case", list(EXACT_CASES))
def test_removing_operators_with_zeroed_branches_keeps_the_output(case):
    make, overrides, granularity, names, _, action = EXACT_CASES[case]
    traced, og, dense = zeroed_trace(make, tuple(overrides.items()), granularity)
    assert {og[n].action for n in names} == {action}

    pruned = prune(traced, plan_for(og, names), operator_graph=og)

    out = run(traced, pruned.gm)
    assert out.shape == dense.shape
    # equal up to float reassociation: a bypassed attention hands the next conv a tensor of another memory layout,
    # and one-thread oneDNN then sums in another order (measured: 1.1e-6 on outputs of magnitude 1.7)
    assert torch.allclose(out, dense, rtol=0, atol=1e-5)
    remaining = {n.target for n in pruned.gm.graph.nodes if n.op == "call_module"}
    assert remaining.isdisjoint(names)
    if case == "transformer":  # Transformer2DModel returns a tuple
        assert pruned.summary["cases"]["module returns a tuple -> getitem"] == 3
    if case == "resnet-identity-scaled":
        assert sum(n.op == "call_function" and n.args[1:] == (2.0,) for n in pruned.gm.graph.nodes) == 2


# --- consistency of analysis and rewrite -------------------------------------------------------------------------
@pytest.mark.parametrize(("make", "granularity"), [(make_tiny_sd_unet, "block"), (make_tiny_sd_unet, "sublayer"),
                                                   (make_tiny_unet2d, "block")])
def test_rewritten_graph_equals_the_stand_ins_for_a_random_plan(make, granularity):
    model, traced, og = dense(make, granularity)
    names = random.Random(7).sample([op.name for op in og.candidates], 6)
    pruned = prune(traced, plan_for(og, names), operator_graph=og)
    # the traced inputs, and another batch and latent size (the graph is dynamic in both)
    other = unet_example_inputs(model, batch=3, height=32, width=32, seed=1)
    for inputs in (traced.example_inputs, other):
        args = [inputs[n] for n in traced.input_names]
        with contextlib.ExitStack() as stack, torch.no_grad():
            for name in names:
                stack.enter_context(swapped(traced.gm, og[name]))
            expected = traced.gm(*args)
        with torch.no_grad():
            got = pruned.gm(*args)
        # stand-ins feed conv_shortcut a contiguous copy; the graph does not: equal up to float reassociation
        assert torch.allclose(got, expected, rtol=0, atol=1e-5)
    assert got.shape == (3, model.config.out_channels, 32, 32)
    assert pruned.summary["ops_removed"] == 6 and sorted(pruned.summary["removed"]) == sorted(names)


def test_pruned_params_macs_and_shape_match_the_plan_and_the_users_model_is_untouched():
    model, traced, og = dense(make_tiny_sd_unet, "sublayer")
    state = {k: v.clone() for k, v in model.state_dict().items()}
    modules = [name for name, _ in model.named_modules()]
    code = traced.gm.code
    names = ["down_blocks.0.resnets.0", "down_blocks.1.resnets.0", "up_blocks.1.resnets.0",
             "mid_block.attentions.0.transformer_blocks.0.attn2", "up_blocks.1.attentions.1.transformer_blocks.0.ff"]
    plan = plan_for(og, names)

    pruned = prune(traced, plan, operator_graph=og)

    assert count_params(pruned.gm) == plan.predicted_params
    s = pruned.summary
    assert (s["params_before"], s["params_after"]) == (plan.total_params, plan.predicted_params)
    assert s["macs_per_sample_after"] == plan.predicted_macs
    assert s["per_action"] == {"identity": 3, "shortcut": 2, "conv1x1": 0}
    assert s["cases"]["residual branch -> add replaced by skip"] == 2
    assert s["cases"]["channels differ -> shortcut"] == 2
    assert s["cases"]["output used by a skip concat"] == 1  # down_blocks.1.resnets.0 feeds a concat
    assert run(traced, pruned.gm).shape == run(traced).shape == (2, 4, 16, 16)
    # the kept conv_shortcut is all that remains of a shortcut resnet
    assert [n for n, _ in pruned.gm.get_submodule("down_blocks.1.resnets.0").named_children()] == ["conv_shortcut"]
    # neither the traced graph nor the user's model lost anything
    assert traced.gm.code == code and count_params(traced.gm) == plan.total_params
    assert [name for name, _ in model.named_modules()] == modules
    after = model.state_dict()
    assert after.keys() == state.keys() and all(torch.equal(after[k], state[k]) for k in state)


def test_rewrite_applies_to_a_fresh_trace_of_the_same_model():
    model, _, og = dense(make_tiny_unet2d, "block")
    names = ["down_blocks.0.resnets.0", "up_blocks.0.resnets.1", "up_blocks.0.attentions.1"]
    plan = plan_for(og, names)
    fresh = trace_unet(model)
    result = RemoveOperators(plan, og)(fresh.gm)
    assert result.modified and result.gm is fresh.gm
    assert count_params(fresh.gm) == plan.predicted_params
    assert torch.equal(run(fresh), run(og.traced, prune(og.traced, plan, operator_graph=og).gm))


# --- conv1x1 on a custom UNet: golden rewritten graph ------------------------------------------------------------
TINY_NET_PRUNED = """
def forward(self, sample):
    conv_in = self.conv_in(sample);  sample = None
    ldpruner_projections_widen = self.ldpruner_projections.widen(conv_in);  conv_in = None
    down = self.down(ldpruner_projections_widen)
    low = self.low(down);  down = None
    up = self.up(low);  low = None
    cat = torch.cat([up, ldpruner_projections_widen], dim = 1);  up = ldpruner_projections_widen = None
    ldpruner_projections_merge = self.ldpruner_projections.merge(cat);  cat = None
    ldpruner_projections_head = self.ldpruner_projections.head(ldpruner_projections_merge);  ldpruner_projections_merge = None
    return ldpruner_projections_head
    """  # noqa: E501


def test_conv1x1_rewrite_of_a_custom_unet_is_golden_and_matches_the_stand_ins():
    _, traced, og = trace_tiny_net()
    assert {op.name: op.action for op in og} == {
        "widen": Action.CONV1X1, "same": Action.IDENTITY, "low": Action.IDENTITY,
        "merge": Action.CONV1X1, "head": Action.CONV1X1}
    names = ["widen", "same", "merge", "head"]
    plan = plan_for(og, names)

    pruned = prune(traced, plan, operator_graph=og)

    assert pruned.gm.code.strip() == TINY_NET_PRUNED.strip()
    assert sorted(pruned.gm.get_submodule(PROJECTION_ROOT).keys()) == sorted(projection_key(n) for n in
                                                                               ["widen", "merge", "head"])
    assert count_params(pruned.gm) == plan.predicted_params
    assert pruned.summary["cases"] == {
        "channels differ -> new projection": 3, "output is a graph output": 1,
        "output used by a skip concat": 1, "several users": 1}
    with contextlib.ExitStack() as stack:
        for name in names:
            stack.enter_context(swapped(traced.gm, og[name]))
        expected = run(traced)
    assert torch.equal(run(traced, pruned.gm), expected)
    # a partial identity: channel i of the 8 inputs is channel i of widen's 16 outputs, the rest start at zero
    x = torch.randn(1, 8, 4, 4)
    y = pruned.gm.get_submodule(f"{PROJECTION_ROOT}.widen")(x)
    assert torch.equal(y[:, :8], x) and not y[:, 8:].any()


def test_projection_keys_do_not_collide_with_dotted_names():
    assert projection_key("down_blocks.0.resnets.1") == "down_blocks__0__resnets__1"


# --- errors ------------------------------------------------------------------------------------------------------
@pytest.fixture
def sd_block():
    _, traced, og = dense(make_tiny_sd_unet, "block")
    return traced, og


def test_unknown_operator_is_a_plan_error_naming_it_and_close_names(sd_block):
    traced, og = sd_block
    plan = plan_for(og, ["mid_block.resnets.0"])
    typo = PlannedRemoval("mid_block.resnet.0", "identity", 1, 1)
    bad = RemovalPlan((*plan.removals, typo), plan.model_class, plan.granularity, plan.total_params, plan.total_macs)
    code = traced.gm.code
    with pytest.raises(PlanError,
                       match=r"'mid_block.resnet.0' is not an operator.*close names: \['mid_block.resnets.0'"):
        prune(traced, bad, operator_graph=og)
    with pytest.raises(PlanError, match="mid_block.resnet.0"):
        RemoveOperators(bad, og)(traced.gm)  # validated whole before anything is touched:
    assert traced.gm.code == code and count_params(traced.gm) == og.total_params


def test_wrong_action_and_non_removable_operators_are_plan_errors(sd_block):
    traced, og = sd_block
    wrong = PlannedRemoval("up_blocks.0.resnets.0", "identity", og["up_blocks.0.resnets.0"].params, 0)
    fixed = PlannedRemoval("down_blocks.0.downsamplers.0", "identity", 0, 0)
    plan = RemovalPlan((wrong, fixed), "UNet2DConditionModel", "block", og.total_params, og.total_macs)
    with pytest.raises(PlanError) as info:
        prune(traced, plan, operator_graph=og)
    message = str(info.value)  # every mismatch is listed, not only the first
    assert "'up_blocks.0.resnets.0': the plan says action 'identity', the graph says 'shortcut'" in message
    assert "'down_blocks.0.downsamplers.0' is not removable: changes spatial size" in message


def test_plan_for_another_granularity_is_a_plan_error(sd_block):
    traced, og = sd_block
    plan = plan_for(og, ["mid_block.resnets.0"])
    other = RemovalPlan(plan.removals, plan.model_class, "sublayer", plan.total_params, plan.total_macs)
    with pytest.raises(PlanError, match="plan granularity 'sublayer' differs from the graph's 'block'"):
        prune(traced, other, operator_graph=og)


def test_running_the_pass_twice_is_rejected(sd_block):
    traced, og = sd_block
    plan = plan_for(og, ["mid_block.resnets.0", "up_blocks.1.attentions.0"])
    gm = prune(traced, plan, operator_graph=og).gm
    code = gm.code
    with pytest.raises(PlanError, match=r"'mid_block.resnets.0' is no longer called in this graph \(already removed"):
        RemoveOperators(plan, og)(gm)
    assert gm.code == code


def test_empty_plan_is_an_error_unless_allowed(sd_block):
    traced, og = sd_block
    empty = plan_for(og, [])
    with pytest.raises(RewriteError, match="removes no operator.*allow_empty=True"):
        prune(traced, empty, operator_graph=og)
    pruned = prune(traced, empty, operator_graph=og, allow_empty=True)
    assert pruned.gm.code == traced.gm.code and pruned.summary["ops_removed"] == 0


def test_joint_removal_that_kills_an_unplanned_module_is_reported(sd_block):
    # every resnet gone leaves the time embedding without users: the per-operator prediction cannot see that
    traced, og = sd_block
    resnets = [op.name for op in og.candidates if op.kind == "resnet"]
    with pytest.raises(RewriteError, match=r"plan predicts .*time_embedding \(20,736\)"):
        prune(traced, plan_for(og, resnets), operator_graph=og)


def test_pass_manager_runs_the_pass_with_the_verifier(sd_block):
    traced, og = sd_block
    gm = copy.deepcopy(traced.gm)
    inputs = [traced.example_inputs[n] for n in traced.input_names]
    manager = PassManager([RemoveOperators(plan_for(og, ["mid_block.attentions.0"]), og)],
                          verify=lambda g: verify_graph(g, inputs, og.output_shape))
    result = manager(gm)
    assert result.modified and result.summary["RemoveOperators"]["ops_removed"] == 1
    with pytest.raises(PlanError, match=r"in pass RemoveOperators \(passes already run: none\)"):
        manager(gm)
