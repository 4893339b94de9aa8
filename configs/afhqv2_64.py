"""AFHQv2 64x64 (EDM, Table 7): as FFHQ-64 but dropout 0.25. Variant ':arch=ncsnpp'."""

import importlib.util
from pathlib import Path

_spec = importlib.util.spec_from_file_location("_ffhq64", Path(__file__).with_name("ffhq64.py"))
_ffhq = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_ffhq)


def get_config(arg=None):
    """FFHQ-64's recipe with dropout 0.25 and the AFHQv2 zip."""
    c = _ffhq.get_config(arg, dropout=0.25)
    c.data.path = "datasets/afhqv2-64x64.zip"
    return c
