"""Make the small torch files that tests/test_reader.py reads (run with torch, never by the tests).

    python tests/data/make_torch_files.py   # in a venv with torch (2.13.0 CPU was used)

Writes into tests/data/:
- ``torch_state_dict.pt``: a Linear's state_dict plus one tensor of every dtype the reader
  supports, a non-contiguous view, two tensors sharing one storage, a 0-d and an empty tensor.
- ``torch_training.ckpt``: ``{'model', 'model_ema', 'step': 3, 'config': {...}}``.
- ``torch_legacy.pt``: a state_dict in torch's old (non-zip) format, with shared storages.
- ``torch_script.pt``: a traced TorchScript archive of a tiny module, with one tensor constant
  (its code/ is never run by us).
- ``torch_malicious.pt``: a torch zip whose data.pkl calls ``os.system('touch
  pwned_by_torch_zip')``; torch itself (``weights_only=True``) refuses it too.
- ``torch_expected.npz``: every tensor above as torch's own ``.numpy()`` (bfloat16 as float32),
  keyed ``<file stem>/<dotted name>``.
"""

import os
from collections import OrderedDict
from pathlib import Path

import numpy as np
import torch

OUT = Path(__file__).resolve().parent
OFFSET = torch.tensor([0.25, -0.5])  # a tensor constant: tracing stores it in constants.pkl


class Tiny(torch.nn.Module):
    """A Linear, a GroupNorm, a buffer and a tensor constant, for the TorchScript archive."""

    def __init__(self):
        super().__init__()
        self.proj = torch.nn.Linear(3, 2)
        self.norm = torch.nn.GroupNorm(1, 2)
        self.register_buffer("scale", torch.tensor([0.5, 2.0]))

    def forward(self, x):
        return self.norm(self.proj(x)) * self.scale + OFFSET


class Payload:
    """Unpickling this object runs a shell command (the malicious file)."""

    def __reduce__(self):
        return (os.system, ("touch pwned_by_torch_zip",))


def state_dict() -> OrderedDict:
    """A real module state_dict (with _metadata) and one tensor of every dtype and layout."""
    torch.manual_seed(0)
    sd = torch.nn.Linear(3, 2).state_dict()
    base = torch.randn(4, 6)
    sd["view.transposed"] = base.t()  # non-contiguous, strides (1, 6)
    sd["view.columns"] = base[:, 1:5:2]  # offset 1, strides (6, 2)
    sd["shared.first"] = base[:2]  # these three share base's storage
    sd["shared.second"] = base[2:]
    for dtype in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
        sd[f"dtype.{str(dtype)[6:]}"] = torch.randn(2, 3).to(dtype)
    for dtype in (torch.int8, torch.int16, torch.int32, torch.int64, torch.uint8):
        info = torch.iinfo(dtype)
        sd[f"dtype.{str(dtype)[6:]}"] = torch.tensor([info.min, 0, 1, info.max], dtype=dtype)
    sd["dtype.bool"] = torch.tensor([[True, False], [False, True]])
    sd["scalar"] = torch.tensor(3.25)
    sd["empty"] = torch.zeros(0, 3)
    sd["param"] = torch.nn.Parameter(torch.arange(3.0))
    return sd


def expected(prefix: str, tree, out: dict) -> None:
    """Every tensor of tree as torch's .numpy() under '<prefix>/<dotted name>'."""
    if isinstance(tree, torch.Tensor):
        t = tree.detach()
        out[prefix] = (t.float() if t.dtype == torch.bfloat16 else t).numpy().copy()
    elif isinstance(tree, dict):
        for k, v in tree.items():
            expected(f"{prefix}.{k}" if "/" in prefix else f"{prefix}/{k}", v, out)


def main() -> None:
    """Write the files and the expected arrays."""
    out: dict = {}
    sd = state_dict()
    torch.save(sd, OUT / "torch_state_dict.pt")
    expected("torch_state_dict", sd, out)
    torch.manual_seed(1)
    model = torch.nn.Sequential(torch.nn.Conv2d(1, 2, 3), torch.nn.Linear(2, 2))
    ckpt = {
        "model": model.state_dict(),
        "model_ema": model.state_dict(),
        "step": 3,
        "config": {"lr": 1e-3, "name": "tiny", "widths": [1, 2], "ema": True, "seed": None},
    }
    torch.save(ckpt, OUT / "torch_training.ckpt")
    expected("torch_training", ckpt, out)
    legacy = OrderedDict(
        a=sd["shared.first"],
        b=sd["shared.second"],
        t=sd["view.transposed"],
        h=sd["dtype.float16"],
        i=sd["dtype.int64"],
    )
    torch.save(legacy, OUT / "torch_legacy.pt", _use_new_zipfile_serialization=False)
    expected("torch_legacy", legacy, out)
    torch.manual_seed(2)
    x = torch.linspace(-1, 1, 6).reshape(2, 3)
    script = torch.jit.trace(Tiny(), x)
    script.save(str(OUT / "torch_script.pt"))
    expected("torch_script", script.state_dict(), out)
    out["torch_script_constant"] = OFFSET.numpy()
    out["torch_script/input"] = x.numpy()
    out["torch_script/output"] = (
        script(torch.from_numpy(out["torch_script/input"])).detach().numpy()
    )
    torch.save({"weight": torch.ones(2), "payload": Payload()}, OUT / "torch_malicious.pt")
    np.savez_compressed(OUT / "torch_expected.npz", **out)


if __name__ == "__main__":
    main()
