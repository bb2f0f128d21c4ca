"""Tiny seeded models shared by the tests (built in code, random weights, fast)."""

from __future__ import annotations

import pytest
import torch


def make_tiny_sd_unet(seed: int = 0, **overrides):
    """An SD-shaped UNet2DConditionModel: two levels, cross-attention in the outer level, 16x16 latents."""
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    config = dict(
        sample_size=16,
        in_channels=4,
        out_channels=4,
        block_out_channels=(32, 64),
        layers_per_block=1,
        cross_attention_dim=32,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        attention_head_dim=8,
        norm_num_groups=8,
    )
    config.update(overrides)
    return UNet2DConditionModel(**config).eval()


def make_tiny_unet2d(seed: int = 0, **overrides):
    """An LDM-style unconditional UNet2DModel with self-attention blocks, 16x16 latents."""
    from diffusers import UNet2DModel

    torch.manual_seed(seed)
    config = dict(
        sample_size=16,
        in_channels=3,
        out_channels=3,
        block_out_channels=(32, 64),
        layers_per_block=1,
        down_block_types=("DownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=8,
        norm_num_groups=8,
    )
    config.update(overrides)
    return UNet2DModel(**config).eval()


@pytest.fixture
def tiny_sd_unet():
    return make_tiny_sd_unet()


@pytest.fixture
def tiny_unet2d():
    return make_tiny_unet2d()


@pytest.fixture(scope="module")
def one_thread():
    """Tiny UNets gain nothing from intra-op threads, and a second thread thrashes on a busy 2-core box."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# --- the command line on a tiny saved UNet (the CLI error and build-record tests) ------------------------------------

CLI_FAST = ["--num-samples", "2", "--steps", "1", "--height", "8", "--width", "8"]


@pytest.fixture(scope="module")
def unet_dir(tmp_path_factory):
    """A tiny SD UNet saved as a UNet folder (one per test module)."""
    path = tmp_path_factory.mktemp("model") / "unet"
    make_tiny_sd_unet().save_pretrained(path, safe_serialization=True)
    return path


def run_cli(capsys, *argv) -> tuple[int, str]:
    """(exit code, the last stderr line) of ``ldpruner ARGV``; an error is one line, said once."""
    from ldpruner.cli import main

    code = main([str(a) for a in argv])
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) <= 1 or not err[-1].startswith("error:") or len([e for e in err if e.startswith("error:")]) == 1
    return code, (err[-1] if err else "")


def rank_environment(rank: int, world: int, port: int) -> None:
    """The environment torchrun gives rank ``rank`` of ``world`` (gloo on localhost ``port``), one thread."""
    import os

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE=str(world))
    torch.set_num_threads(1)


def run_ranks(worker, world: int, *args, timeout: float = 120) -> None:
    """``worker(rank, world, port, *args)`` in ``world`` spawned processes (a free port for their gloo group); fails
    the test when they have not finished within ``timeout`` seconds, or when one raised."""
    import socket
    import time

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    context = mp.start_processes(worker, args=(world, port, *args), nprocs=world, join=False, start_method="spawn")
    deadline = time.monotonic() + timeout
    try:
        while not context.join(timeout=1):
            if time.monotonic() > deadline:
                pytest.fail(f"the {world} ranks did not finish within {timeout:g} s")
    finally:
        for process in context.processes:
            if process.is_alive():
                process.terminate()
