"""The student/ folder: a pruned UNet saved without pickle and rebuilt with identical outputs; bad folders are
typed errors."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import make_tiny_sd_unet
from safetensors.torch import load_file, save_file
from test_remove import Block, TinyNet, plan_for, run

from ldpruner.base.errors import ArtifactError, ModelLoadError
from ldpruner.compiler.graph import build_operator_graph
from ldpruner.compiler.removal import PROJECTION_ROOT
from ldpruner.compiler.tracer import trace_unet
from ldpruner.passes.remove import count_params, prune
from ldpruner.passes.student import STUDENT_FILES, WEIGHTS_NAME, load_student, save_student

SD_PLAN = ["down_blocks.0.resnets.0", "down_blocks.1.resnets.0",
           "mid_block.attentions.0.transformer_blocks.0.attn2", "up_blocks.1.attentions.1.transformer_blocks.0.ff"]


@pytest.fixture(scope="module")
def sd_student(tmp_path_factory):
    model = make_tiny_sd_unet(seed=3)
    traced = trace_unet(model, granularity="sublayer")
    og = build_operator_graph(traced)
    pruned = prune(traced, plan_for(og, SD_PLAN), operator_graph=og, config=model.config)
    path = save_student(pruned, tmp_path_factory.mktemp("build") / "student")
    return pruned, path


def test_round_trip_gives_identical_outputs(sd_student):
    pruned, path = sd_student
    assert sorted(p.name for p in path.iterdir()) == sorted(STUDENT_FILES)

    loaded = load_student(path)

    assert loaded.gm.code == pruned.gm.code
    assert count_params(loaded.gm) == count_params(pruned.gm) == pruned.plan.predicted_params
    assert loaded.plan == pruned.plan
    assert torch.equal(run(pruned.traced, loaded.gm), run(pruned.traced))
    # other inputs than the ones traced: batch 1, another 16x16 latent
    gen = torch.Generator().manual_seed(1)
    other = [torch.randn(1, 4, 16, 16, generator=gen), torch.tensor([10]), torch.randn(1, 77, 32, generator=gen)]
    with torch.no_grad():
        assert torch.equal(loaded.gm(*other), pruned.gm(*other))


def test_trace_json_records_what_the_trace_needs(sd_student):
    _, path = sd_student
    trace = json.loads((path / "trace.json").read_text())
    assert trace["input_names"] == ["sample", "timestep", "encoder_hidden_states"]
    assert trace["example_inputs"]["timestep"] == {"shape": [2], "dtype": "int64"}
    assert trace["granularity"] == "sublayer" and trace["model_class"] == "UNet2DConditionModel"
    assert trace["validity"]["spatial_multiple"] == 2 and trace["validity"]["decisions"]
    config = json.loads((path / "config.json").read_text())
    assert config["_class_name"] == "UNet2DConditionModel" and config["block_out_channels"] == [32, 64]


def test_custom_unet_with_projections_and_tied_weights_round_trips(tmp_path):
    def tied_net():
        net = TinyNet().eval()
        net.low.conv.weight = net.same.conv.weight  # shared storage: written once, restored as an alias
        return net

    torch.manual_seed(0)
    model = tied_net()
    traced = trace_unet(model, {"sample": torch.randn(2, 3, 8, 8)}, extra_leaf_types=[Block])
    og = build_operator_graph(traced, extra_operator_types=[Block])
    pruned = prune(traced, plan_for(og, ["widen", "merge"]), operator_graph=og)
    with torch.no_grad():  # trained projections, so the test sees them loaded rather than re-initialised
        pruned.gm.get_submodule(f"{PROJECTION_ROOT}.widen").weight.normal_()
    path = save_student(pruned, tmp_path / "student")
    assert "low.conv.weight" not in load_file(str(path / WEIGHTS_NAME))

    with pytest.raises(ModelLoadError, match="not a diffusers UNet.*pass model="):
        load_student(path)
    loaded = load_student(path, model=tied_net(), extra_leaf_types=[Block], extra_operator_types=[Block])

    assert torch.equal(run(traced, loaded.gm), run(traced, pruned.gm))
    assert loaded.gm.get_submodule("low.conv").weight is loaded.gm.get_submodule("same.conv").weight


def test_saving_over_an_existing_folder_needs_overwrite(sd_student, tmp_path):
    pruned, _ = sd_student
    path = save_student(pruned, tmp_path / "student")
    with pytest.raises(ArtifactError, match=r"exists; pass --overwrite \(overwrite=True\)"):
        save_student(pruned, path)
    save_student(pruned, path, overwrite=True)
    assert sorted(p.name for p in path.iterdir()) == sorted(STUDENT_FILES)


def test_a_diffusers_unet_cannot_be_saved_without_its_config(sd_student, tmp_path):
    pruned, _ = sd_student
    bare = type(pruned)(traced=pruned.traced, plan=pruned.plan, summary=pruned.summary)
    with pytest.raises(ArtifactError, match="needs its diffusers config: pass config=model.config"):
        save_student(bare, tmp_path / "student")
    assert not (tmp_path / "student").exists()


@pytest.fixture
def student_copy(sd_student, tmp_path):
    pruned, _ = sd_student
    return save_student(pruned, tmp_path / "student")


def test_corrupt_weights_are_an_artifact_error(student_copy):
    weights = student_copy / WEIGHTS_NAME
    weights.write_bytes(weights.read_bytes()[:100])
    with pytest.raises(ArtifactError, match="is not a readable safetensors file"):
        load_student(student_copy)


def test_missing_file_is_an_artifact_error(student_copy):
    (student_copy / "trace.json").unlink()
    with pytest.raises(ArtifactError, match=r"lacks \['trace.json'\]"):
        load_student(student_copy)
    with pytest.raises(ArtifactError, match="does not exist"):
        load_student(student_copy / "nowhere")


def test_weights_for_another_graph_are_a_model_load_error(student_copy):
    weights = student_copy / WEIGHTS_NAME
    state = load_file(str(weights))
    state["conv_in.bias_renamed"] = state.pop("conv_in.bias")
    save_file(state, str(weights))
    with pytest.raises(ModelLoadError, match=r"1 missing \(e.g. \['conv_in.bias'\]\); 1 unexpected"):
        load_student(student_copy)
