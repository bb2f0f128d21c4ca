"""The CPUs a process may use (affinity, cgroup quota), the threads each stage computes with, and where they are
recorded."""

from __future__ import annotations

import os

import onnx
import pytest
import torch
from conftest import make_tiny_unet2d
from onnx import TensorProto, helper

from ldpruner import api, stages
from ldpruner.base import devices
from ldpruner.base.errors import ConfigError
from ldpruner.runtime.session import create_session
from ldpruner.runtime.timing import ort_session

pytestmark = pytest.mark.usefixtures("one_thread")


def _cgroup(tmp_path, proc: str, files: dict[str, str]):
    """A fake cgroup tree under ``tmp_path/cg`` and a fake /proc/self/cgroup."""
    root = tmp_path / "cg"
    for rel, text in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(text)
    root.mkdir(exist_ok=True)
    (tmp_path / "proc").write_text(proc)
    return root, tmp_path / "proc"


def test_cgroup_v2_quota_is_the_smallest_along_the_process_path(tmp_path):
    root, proc = _cgroup(tmp_path, "0::/jobs/me\n", {"cpu.max": "max 100000\n", "jobs/cpu.max": "300000 100000\n",
                                                    "jobs/me/cpu.max": "max 100000\n"})
    assert devices.cgroup_cpu_limit(root, proc) == 3.0
    (root / "jobs" / "me" / "cpu.max").write_text("150000 100000\n")
    assert devices.cgroup_cpu_limit(root, proc) == 1.5
    root, proc = _cgroup(tmp_path / "none", "0::/\n", {"cpu.max": "max 100000\n"})
    assert devices.cgroup_cpu_limit(root, proc) is None


def test_cgroup_v1_quota_and_no_quota(tmp_path):
    root, proc = _cgroup(tmp_path, "4:cpu,cpuacct:/\n3:memory:/x\n", {"cpu/cpu.cfs_quota_us": "200000\n",
                                                                       "cpu/cpu.cfs_period_us": "100000\n"})
    assert devices.cgroup_cpu_limit(root, proc) == 2.0
    (root / "cpu" / "cpu.cfs_quota_us").write_text("-1\n")
    assert devices.cgroup_cpu_limit(root, proc) is None
    assert devices.cgroup_cpu_limit(tmp_path / "missing", tmp_path / "missing-proc") is None


@pytest.mark.parametrize("affinity, limit, expected", [(8, None, 8), (8, 2.5, 2), (8, 0.5, 1), (2, 6.0, 2)])
def test_available_cpus_is_the_affinity_capped_by_the_whole_cpus_of_the_quota(monkeypatch, affinity, limit,
                                                                                expected):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(affinity)), raising=False)
    monkeypatch.setattr(devices, "cgroup_cpu_limit", lambda: limit)
    assert devices.available_cpus() == expected


def test_resolve_threads_default_nesting_and_bad_values(monkeypatch):
    monkeypatch.setattr(devices, "available_cpus", lambda: 3)
    monkeypatch.setattr(devices, "cpus_in_use", lambda: 0.2)  # an idle machine
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(8)
        assert devices.resolve_threads(None) == 3  # the CPUs this process may use
        torch.set_num_threads(2)
        assert devices.resolve_threads(None) == 2  # never more than torch's own setting (OMP_NUM_THREADS)
        assert devices.resolve_threads(5) == 5 and devices.stage_threads() is None
        with devices.intra_op_threads(1) as outer:
            assert outer == 1 and torch.get_num_threads() == 1 and devices.stage_threads() == 1
            with devices.intra_op_threads(None) as inner:  # a stage inside another takes its threads
                assert inner == 1
        assert torch.get_num_threads() == 2 and devices.stage_threads() is None
    finally:
        torch.set_num_threads(before)
    with pytest.raises(ConfigError) as info:
        devices.resolve_threads(0)
    assert str(info.value) == "threads=0 must be a positive int or None (the CPUs this process may use)"


def test_the_default_leaves_the_cores_other_jobs_keep_busy_to_them(monkeypatch, tmp_path):
    before, measure = torch.get_num_threads(), devices.cpus_in_use
    monkeypatch.setattr(devices, "available_cpus", lambda: 4)
    try:
        torch.set_num_threads(4)
        for busy, threads in ((0.4, 4), (0.6, 3), (1.9, 2), (3.7, 1), (8.0, 1), (None, 4)):
            monkeypatch.setattr(devices, "cpus_in_use", lambda busy=busy: busy)
            assert devices.resolve_threads(None) == threads, busy
            assert devices.resolve_threads(4) == 4  # asked for: as asked
    finally:
        torch.set_num_threads(before)
    # read from /proc/stat: the aggregate cpu line, twice; busy = not idle nor iowait
    stat = tmp_path / "stat"
    samples = iter(["cpu  100 0 100 800 0 0 0 0 0 0\n", "cpu  300 0 200 900 0 0 0 0 0 0\n"])

    def read_text(self, *args, **kwargs):
        return next(samples)

    monkeypatch.setattr(type(stat), "read_text", read_text)
    monkeypatch.setattr(os, "cpu_count", lambda: 2)
    assert measure(window=0, stat=stat) == pytest.approx(300 / 400 * 2)  # 1.5 of 2 CPUs busy
    monkeypatch.undo()
    assert measure(window=0, stat=tmp_path / "missing") is None


def test_onnxruntime_sessions_take_the_stage_threads(tmp_path):
    graph = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "relu",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])])
    path = tmp_path / "relu.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
    with devices.intra_op_threads(3):
        assert create_session(path).session.get_session_options().intra_op_num_threads == 3
        assert ort_session(path, threads=None).get_session_options().intra_op_num_threads == 3
        assert create_session(path, threads=2).session.get_session_options().intra_op_num_threads == 2
    assert create_session(path).session.get_session_options().intra_op_num_threads == 0  # onnxruntime's default


def test_each_command_runs_with_its_threads_and_restores_torchs(monkeypatch, tmp_path):
    seen = {}

    def spy(name, function):
        def wrapped(*args, **kwargs):
            seen[name] = torch.get_num_threads()
            return function(*args, **kwargs)
        monkeypatch.setattr(stages, name, wrapped)

    for name in ("analyze", "costs", "prune", "export", "inspect"):
        spy(name, getattr(stages, name))
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        model = make_tiny_unet2d()
        scores = api.analyze(model, threads=1, num_samples=2, steps=1, height=8, width=8, progress=False)
        assert seen.pop("analyze") == 1 and torch.get_num_threads() == 2
        assert scores.placement["threads"] == 1  # scores.json records it
        costs = api.costs(model, threads=1, runtime="torch", latency_repeats=1, latency_warmup=0, progress=False)
        assert seen.pop("costs") == 1 and costs.placement["threads"] == 1
        other = api.costs(model, threads=2, runtime="torch", latency_repeats=1, latency_warmup=0, progress=False)
        assert other.placement["threads"] == 2 and other.cache_key != costs.cache_key  # measured at: in the key
        plan = api.select(scores, budget=0.1)
        pruned = api.prune(model, plan, threads=1)
        assert seen.pop("prune") == 1 and torch.get_num_threads() == 2
        summary = api.export(pruned, out=tmp_path, threads=1)
        assert seen.pop("export") == 1 and summary["threads"] == 1
        api.inspect(model, threads=1)
        assert seen.pop("inspect") == 1 and torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)
