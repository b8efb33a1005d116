"""What must work on macOS and Windows too: the memory estimate asks psutil, not Linux's /proc."""
import types

import pytest
import torch

from spark_sparse.speed import _memory_budget_mb


def test_the_cpu_memory_budget_comes_from_psutil(monkeypatch):
    psutil = pytest.importorskip("psutil")
    monkeypatch.setattr(psutil, "virtual_memory", lambda: types.SimpleNamespace(available=1234 * 2**20, total=0))
    assert _memory_budget_mb(torch.device("cpu")) == pytest.approx(1234)
