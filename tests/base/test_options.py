"""The option machinery (ldpruner/base/options.py) and the command configs built on it (ldpruner/stages/config.py):
sections made once, flat names routed to them, today's flags and config files unchanged, and a new stage option reaching
every command with one edit."""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

import pytest

from ldpruner.base.errors import ConfigError
from ldpruner.base.flags import add_flags
from ldpruner.base.options import Config, option, section
from ldpruner.passes.config import AnalysisConfig, DistillConfig, TraceConfig
from ldpruner.stages.config import (
    AnalyzeOptions,
    BenchConfig,
    BuildConfig,
    CostsOptions,
    DistillOptions,
    ExportOptions,
    InspectOptions,
    PruneOptions,
    SelectOptions,
    load_config,
)

COMMAND_OPTIONS = {"inspect": InspectOptions, "analyze": AnalyzeOptions, "costs": CostsOptions,
                   "select": SelectOptions, "prune": PruneOptions, "distill": DistillOptions,
                   "export": ExportOptions, "build": BuildConfig, "bench": BenchConfig}
POSITIONALS = {"inspect": ["m"], "analyze": ["m", "--out", "o"], "costs": ["m", "--out", "o"],
               "select": ["s", "--out", "o"], "prune": ["m", "--plan", "p", "--out", "o"],
               "distill": ["m", "s", "--out", "o"], "lora": ["s", "--lora", "l", "--out", "o"],
               "export": ["m", "--out", "o"], "bench": ["m", "--out", "o"], "build": ["m"]}
BEFORE = json.loads((Path(__file__).parents[1] / "cli" / "flags_before_issue21.json").read_text())


def _at(config: Config, flat: str):
    owner, name = type(config).flat()[flat]
    return getattr(config if owner is None else getattr(config, owner), name)


# --- sections: made once, validated once, flat names routed --------------------------------------------------------

def test_a_build_config_holds_each_stage_config_whole():
    cfg = BuildConfig.from_dict({"out": "o", "num_samples": 4, "height": 8, "budget": 0.4, "metric": "macs",
                                 "latency_precision": 0.1, "distill_steps": 0, "exporter": "dynamo", "fp16": False,
                                 "threads": 2, "prompts": "p.txt"})
    assert isinstance(cfg.analysis, AnalysisConfig) and cfg.analysis.num_samples == 4
    assert cfg.trace == TraceConfig(height=8) and cfg.analysis.height is None  # the latent size is the trace's
    assert (cfg.selection.budget, cfg.selection.metric) == (0.4, "macs")
    assert cfg.check.latency_precision == 0.1 and cfg.distill.steps == 0 and cfg.export.exporter == "dynamo"
    assert cfg.placement.threads == 2 and cfg.inputs.prompts == "p.txt" and cfg.analysis.prompts is None
    assert cfg.to_dict()["analysis"]["num_samples"] == 4  # recorded nested
    assert BuildConfig.from_dict(cfg.to_dict()) == cfg  # and read back (a report's config)


def test_flat_keys_sections_and_mappings_mix_and_a_field_given_twice_is_refused():
    cfg = BuildConfig.from_dict({"out": "o", "analysis": {"num_samples": 6}, "distill": {"lr": 0.01},
                                 "distill_options": {"batch_size": 2}, "distill_trajectories": 3, "seed": 5})
    assert (cfg.analysis.num_samples, cfg.analysis.seed) == (6, 5)
    assert (cfg.distill.lr, cfg.distill.batch_size, cfg.distill.trajectories) == (0.01, 2, 3)
    with pytest.raises(ConfigError, match=r"^invalid BuildConfig: num_samples and analysis.num_samples both set "
                                          r"analysis's num_samples: give it once$"):
        BuildConfig.from_dict({"out": "o", "num_samples": 4, "analysis": {"num_samples": 6}})
    with pytest.raises(ConfigError, match=r"^invalid BuildConfig: distill_lr and distill_options lr both set "
                                          r"distill's lr: give it once$"):
        BuildConfig.from_dict({"out": "o", "distill_lr": 0.1, "distill_options": {"lr": 0.2}})
    with pytest.raises(ConfigError, match=r"^invalid BuildConfig: analysis: unknown AnalysisConfig option "
                                          r"'num_sample'; did you mean 'num_samples'\?$"):
        BuildConfig.from_dict({"out": "o", "analysis": {"num_sample": 6}})


def test_the_distillation_follows_the_analysis_seed_and_guidance_unless_told():
    cfg = BuildConfig.from_dict({"out": "o", "seed": 7, "guidance_scale": 3.0})
    assert (cfg.distill.seed, cfg.distill.guidance_scale) == (7, 3.0)
    cfg = BuildConfig.from_dict({"out": "o", "seed": 7, "distill_seed": 1})
    assert (cfg.distill.seed, cfg.analysis.seed) == (1, 7)
    assert BenchConfig.from_dict({"models": ["m"], "out": "o"}).distill.steps == 0  # bench distils when asked


def test_the_distillation_follows_the_analysis_however_the_config_is_made():
    cfg = BuildConfig(out="o", analysis=AnalysisConfig(seed=3, guidance_scale=5.0))
    assert (cfg.distill.seed, cfg.distill.guidance_scale) == (3, 5.0)
    assert dataclasses.replace(cfg, analysis=AnalysisConfig(seed=4)).distill.seed == 4
    assert BuildConfig(out="o", analysis=AnalysisConfig(seed=3), distill=DistillConfig(seed=1)).distill.seed == 1


def test_a_field_another_section_decides_is_refused_not_ignored():
    with pytest.raises(ConfigError, match=r"^invalid BuildConfig: analysis: BuildConfig does not take analysis's "
                                          r"height here; give height \(trace's height\)$"):
        BuildConfig.from_dict({"out": "o", "analysis": {"height": 8}})
    with pytest.raises(ConfigError, match=r"^invalid BenchConfig: selection: BenchConfig does not take selection's "
                                          r"budget here$"):
        BenchConfig.from_dict({"models": ["m"], "out": "o", "selection": {"budget": 0.9}})  # --budgets decide
    # a report records every field: those left at their default read back
    assert BuildConfig.from_dict({"out": "o", "analysis": {"height": None, "num_samples": 4}}).analysis.num_samples == 4


def test_own_and_section_problems_are_reported_together_and_once():
    with pytest.raises(ConfigError) as caught:
        BenchConfig.from_dict({"models": ["m"], "out": "o", "budgets": [2], "metric": "flops"})
    assert str(caught.value) == ("invalid BenchConfig: budgets=[2] must be a sequence of finite numbers, each in "
                                 "(0, 1) (e.g. 0.3 removes 30 %); metric='flops' is not one of ['params', 'macs', "
                                 "'latency']")
    with pytest.raises(ConfigError) as caught:
        BuildConfig.from_dict({"out": "o", "tolerances": {"float32": (-1, 0)}})
    assert str(caught.value).count("atol=-1 must be >= 0") == 1


def test_a_clashes_entry_must_resolve_a_clash():
    @dataclasses.dataclass(frozen=True)
    class Idle(Config):
        clashes = {"prompts": "analysis"}
        analysis: AnalysisConfig = section(AnalysisConfig)

    with pytest.raises(TypeError, match=r"clashes entries that resolve no clash between its sections: \['prompts'\]"):
        Idle.flat()


def test_problems_of_every_section_in_one_error_under_their_flat_names():
    with pytest.raises(ConfigError) as caught:
        BuildConfig.from_dict({"out": "o", "steps": 0, "distill_lr": -1, "budget": 2})
    assert str(caught.value) == ("invalid BuildConfig: steps=0 must be >= 1; budget=2 must be in (0, 1) (e.g. 0.3 "
                                 "removes 30 %); distill_lr=-1 must be > 0")
    with pytest.raises(ConfigError, match=r"^invalid BuildConfig: distill: every loss weight is 0 \(w_out, w_feat, "
                                          r"w_task\): nothing would be learned$"):
        BuildConfig.from_dict({"out": "o", "distill_options": {"w_out": 0, "w_feat": 0}})


def test_given_is_what_was_set_on_purpose():
    cfg = BuildConfig.from_dict({"out": "o", "distill_options": {"lr": 5e-4}, "num_samples": 8})
    assert cfg.distill.given() == {"lr"} and cfg.analysis.given() == {"num_samples"}
    assert DistillConfig(batch_size=3).given() == {"batch_size"}  # made directly: what differs from the defaults


def test_a_name_two_sections_declare_must_be_resolved_when_the_class_is_used():
    @dataclasses.dataclass(frozen=True)
    class Ambiguous(Config):
        trace: TraceConfig = section(TraceConfig)
        analysis: AnalysisConfig = section(AnalysisConfig)

    with pytest.raises(TypeError, match=r"flat names several sections declare: height \(trace, analysis\), width "
                                        r"\(trace, analysis\); say which section each means in clashes"):
        Ambiguous.flat()
    assert AnalyzeOptions.flat()["height"] == ("trace", "height")


def test_an_unknown_option_of_a_stage_command_names_the_close_one():
    with pytest.raises(ConfigError, match=r"^unknown option 'num_sample'; did you mean 'num_samples'\?$"):
        AnalyzeOptions.from_dict({"num_sample": 2})
    with pytest.raises(ConfigError, match=r"^unknown option 'verify'; the options are budget, device, metric, order, "
                                          r"placement, search_cap, selection, shortlist, threads$"):
        SelectOptions.from_dict({"verify": True})  # selection prunes nothing
    with pytest.raises(ConfigError, match=r"^unknown option 'device'; the options are height, placement, prune, "
                                          r"threads, trace, verify, width$"):
        PruneOptions.from_dict({"device": "cpu"})  # prune exposes the trace's size and the threads only


# --- today's flags, keywords and config files keep working -------------------------------------------------------

@pytest.mark.parametrize("command", sorted(BEFORE))
def test_every_flag_of_before_parses_to_the_same_value_and_reaches_its_option(command):
    from ldpruner.cli import build_parser

    parser = build_parser()
    for row in BEFORE[command]:
        args = parser.parse_args([command, *POSITIONALS[command], *row["argv"]])
        value = getattr(args, row["dest"])
        assert value == row["value"], (command, row)
        options = COMMAND_OPTIONS.get(command)
        if options is None or row["dest"] not in options.flat() and row["dest"] not in options.mappings:
            continue  # an I/O flag of the command itself (--resume, --scale, --prompts of analyze …)
        nested = options.nest({row["dest"]: value})
        if row["dest"] in options.mappings:
            assert nested[options.mappings[row["dest"]]] == value, (command, row)
            continue
        owner, name = options.flat()[row["dest"]]
        assert (nested[name] if owner is None else nested[owner][name]) == value, (command, row)


def test_a_flat_config_file_of_before_still_builds_the_same_config(tmp_path):
    flat = tmp_path / "flat.toml"
    flat.write_text('out = "o"\nnum_samples = 4\nsteps = 3\nbudget = 0.4\ndistill_steps = 5\nthreads = 1\n'
                    '[distill_options]\nbatch_size = 2\n')
    nested = tmp_path / "nested.toml"
    nested.write_text('out = "o"\n[analysis]\nnum_samples = 4\nsteps = 3\n[selection]\nbudget = 0.4\n'
                      '[distill]\nsteps = 5\nbatch_size = 2\n[placement]\nthreads = 1\n')
    assert load_config(flat) == load_config(nested)
    # the command line wins over the file, field by field
    over = load_config(nested, num_samples=6, distill_steps=None)
    assert (over.analysis.num_samples, over.analysis.steps, over.distill.steps) == (6, 3, 5)


# --- one edit: a new field of a stage config reaches every command holding it --------------------------------------

@dataclasses.dataclass(frozen=True)
class _ProbedAnalysis(AnalysisConfig):
    probe: int = option(3, "a throwaway analysis option", minimum=0)


def _with_probe(config: type[Config]) -> type[Config]:
    """``config`` whose analysis section is :class:`_ProbedAnalysis` — the one edit a new AnalysisConfig field is."""
    return dataclasses.make_dataclass(config.__name__, [("analysis", _ProbedAnalysis, section(_ProbedAnalysis))],
                                      bases=(config,), frozen=True)


@pytest.mark.parametrize("config", [AnalyzeOptions, BuildConfig, BenchConfig])
def test_a_new_analysis_field_reaches_flags_keywords_and_config_files(config, tmp_path):
    probed = _with_probe(config)
    required = {} if config is AnalyzeOptions else {"out": "o"} | ({"models": ["m"]} if config is BenchConfig else {})
    assert probed.from_dict({**required, "probe": 5}).analysis.probe == 5  # a keyword, a flat file key
    assert probed.from_dict({**required, "analysis": {"probe": 6}}).analysis.probe == 6  # a [analysis] table
    assert probed.from_dict(required).analysis.probe == 3
    with pytest.raises(ConfigError, match=r"probe=-1 must be >= 0"):
        probed.from_dict({**required, "probe": -1})
    parser = argparse.ArgumentParser()
    add_flags(parser, probed)
    assert vars(parser.parse_args(["--probe", "7"]))["probe"] == 7
    assert "a throwaway analysis option (default: 3)" in parser.format_help()


def test_a_hidden_field_stays_hidden_and_a_new_field_of_the_section_is_exposed_with_no_edit():
    from ldpruner.stages.config import BenchConfig

    flat = BenchConfig.flat()
    assert flat["order"] == ("selection", "order") and flat["shortlist"] == ("selection", "shortlist")
    assert flat["search_cap"] == ("selection", "search_cap")  # issue 22's options: one edit, in passes/config.py
    assert "budget" not in flat  # bench's budgets are its own list
