"""AFHQv2 64x64 (EDM, Table 7): as FFHQ-64 but dropout 0.25. Variant ':arch=ncsnpp'."""

from edm_jax.train.recipes import edm_64x64


def get_config(arg=None):
    """FFHQ-64's recipe with dropout 0.25 and the AFHQv2 zip."""
    return edm_64x64(arg, path="datasets/afhqv2-64x64.zip", dropout=0.25)
