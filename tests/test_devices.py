"""The device option of extract and explain (pipeline/devices.py)."""
import torch

from rep_pipeline.pipeline.devices import torch_device


def test_auto_takes_a_gpu_only_where_torch_sees_one(monkeypatch):
    assert torch_device("cpu") == torch.device("cpu")
    assert torch_device("cuda") == torch.device("cuda")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert torch_device("auto") == torch.device("cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert torch_device("auto") == torch.device("cuda")
