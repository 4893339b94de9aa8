"""python -m edm_jax.convert SRC [--family F] --out DST.npz: convert a released checkpoint.

guided-diffusion and v-diffusion checkpoints (.pt/.pth/.safetensors, read without torch) become
a .npz of Flax params that ``edm_jax.pretrained.load_pretrained`` (and ``sample.py
--checkpoint DST.npz``) loads without converting again. See ``edm_jax.pretrained``.
"""

import sys

from edm_jax.pretrained import convert_main

if __name__ == "__main__":
    sys.exit(convert_main())
