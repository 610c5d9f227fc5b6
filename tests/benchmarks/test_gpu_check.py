"""benchmarks/gpu_check.py without a GPU: it says so, writes {"cuda": false} and exits 0; its
comparisons and training steps run on the CPU (the GPU side of them runs on a CUDA machine)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from benchmarks import gpu_check

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.skipif(torch.cuda.is_available(), reason="the fallback is for machines without CUDA")
def test_without_cuda_it_says_so_and_exits_0(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "gpu_check.json"
    assert gpu_check.main(["--out", str(out)]) == 0
    assert "no CUDA device" in capsys.readouterr().out
    result = json.loads(out.read_text())
    assert result["cuda"] is False and "date" in result


def test_the_device_checks_pass_on_equal_devices_and_catch_a_difference() -> None:
    cpu = torch.device("cpu")
    checks = gpu_check.cpu_vs(cpu)
    assert checks["grad_samples"]["ok"] and checks["dp_step"]["ok"]
    assert checks["grad_samples"]["tensors"] > 0
    reference = gpu_check.dp_step(cpu)
    moved = {name: value + 1e-3 for name, value in reference.items()}
    assert not gpu_check.compare(reference, moved)["ok"]


@pytest.mark.parametrize("mode", ["plain", "bf16", "dp"])
def test_each_throughput_mode_trains(mode: str) -> None:
    step, batch = gpu_check.step_fn("micro", "2d", mode, torch.device("cpu"))
    step()
    assert batch == gpu_check.BATCH["micro"]["2d"]
