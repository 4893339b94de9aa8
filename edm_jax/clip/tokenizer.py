"""CLIP's byte-level BPE tokenizer, as ``clip.tokenize`` (OpenAI) and ``open_clip.tokenize`` compute it.

The vocabulary (``bpe_simple_vocab_16e6.txt.gz``) is data the user has: it ships with the
``clip`` and ``open_clip`` packages and beside released weights (a diffusers folder's ``tokenizer/merges.txt`` or ``tokenizer.json``
holds the same merges, and is read too). ``find_vocab`` looks in
``$EDM_JAX_CLIP_VOCAB`` and in those installed packages; otherwise pass the path.

Cleaning: ``ftfy.fix_text``, ``html.unescape`` twice, strip, whitespace runs to one space,
strip, lowercase. Words are split with the reference's regex (``\\p{L}`` needs ``regex``); each
word's UTF-8 bytes map to printable unicode and merge by rank, ``</w>`` on the last symbol.
A sequence is ``[sot] + ids + [eot]`` zero-padded to the context; a longer one keeps the first
``context_length`` tokens with eot written over the last (``truncate=True``), or is refused.
"""

from __future__ import annotations

import functools
import gzip
import html
import importlib.util
import json
import os
import re
import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np

SOT = 49406
EOT = 49407
CONTEXT_LENGTH = 77
VOCAB_FILE = "bpe_simple_vocab_16e6.txt.gz"
N_MERGES = 49152 - 256 - 2
_PATTERN = (
    r"<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"
)


class TokenizerError(ValueError):
    """A vocabulary that cannot be used, or a prompt refused without truncation."""


@functools.cache
def byte_unicode() -> dict[int, str]:
    """Byte -> printable character: printable latin-1 bytes map to themselves, the rest to 256+."""
    keep = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    ]
    table = {b: chr(b) for b in keep}
    extra = 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + extra)
            extra += 1
    return table


def _package_vocab() -> Path | None:
    for package in ("open_clip", "clip"):
        spec = importlib.util.find_spec(package) if _importable(package) else None
        for root in (spec.submodule_search_locations or []) if spec else []:
            path = Path(root) / VOCAB_FILE
            if path.is_file():
                return path
    return None


def _importable(package: str) -> bool:
    try:
        return importlib.util.find_spec(package) is not None
    except (ImportError, ValueError):
        return False


def find_vocab(path: str | os.PathLike | None = None) -> Path:
    """The vocabulary file: ``path``, else ``$EDM_JAX_CLIP_VOCAB``, else an installed clip/open_clip."""
    if path is not None and not str(path).strip():
        raise TokenizerError(f"CLIP vocabulary path is empty: pass the path of {VOCAB_FILE}")
    chosen = path or os.environ.get("EDM_JAX_CLIP_VOCAB") or _package_vocab()
    if chosen is None:
        raise TokenizerError(
            f"no CLIP vocabulary found: pass the path of {VOCAB_FILE} (shipped with the clip and "
            "open_clip packages) or set EDM_JAX_CLIP_VOCAB"
        )
    chosen = Path(chosen)
    if not chosen.is_file():
        raise TokenizerError(
            f"CLIP vocabulary {str(chosen)!r} does not exist (expected {VOCAB_FILE})"
        )
    return chosen


def clean(text: str) -> str:
    """The reference's cleanup: ftfy, HTML entities twice, whitespace, lower case."""
    import ftfy

    text = html.unescape(html.unescape(ftfy.fix_text(text))).strip()
    return re.sub(r"\s+", " ", text).strip().lower()


def _read_merges(path: Path) -> list[tuple[str, ...]]:
    """The BPE merges of a .gz vocabulary, an HF merges.txt or an HF tokenizer.json."""
    kind = {".gz": "gzip BPE merges file", ".json": "tokenizer.json"}.get(path.suffix, "merges.txt")
    try:
        with (gzip.open if path.suffix == ".gz" else open)(path, "rt", encoding="utf-8") as f:
            text = f.read()
        if path.suffix == ".json":
            merges = json.loads(text)["model"]["merges"]  # "a b" strings, or [a, b] pairs
            return [tuple(m.split() if isinstance(m, str) else m) for m in merges]
    except (OSError, EOFError, UnicodeDecodeError, ValueError, KeyError, TypeError) as e:
        raise TokenizerError(f"CLIP vocabulary {str(path)!r} is not a {kind}: {e}") from None
    return [tuple(line.split()) for line in text.split("\n")[1 : N_MERGES + 1]]


class Tokenizer:
    """CLIP's BPE tokenizer over one vocabulary file."""

    def __init__(self, vocab_path: str | os.PathLike | None = None):
        import regex

        path = find_vocab(vocab_path)
        merges = _read_merges(path)
        if len(merges) != N_MERGES or any(len(m) != 2 for m in merges):
            raise TokenizerError(
                f"CLIP vocabulary {str(path)!r} has {len(merges)} merge lines; expected {N_MERGES} pairs"
            )
        base = list(byte_unicode().values())
        vocab = base + [v + "</w>" for v in base] + ["".join(m) for m in merges]
        vocab += ["<|startoftext|>", "<|endoftext|>"]
        self.encoder = {v: i for i, v in enumerate(vocab)}
        self.ranks = {m: i for i, m in enumerate(merges)}
        self.pattern = regex.compile(_PATTERN, regex.IGNORECASE)
        self.cache = {"<|startoftext|>": "<|startoftext|>", "<|endoftext|>": "<|endoftext|>"}
        if self.encoder["<|startoftext|>"] != SOT or self.encoder["<|endoftext|>"] != EOT:
            raise TokenizerError(
                f"CLIP vocabulary {str(path)!r} does not give sot={SOT}, eot={EOT}"
            )

    def bpe(self, word: str) -> str:
        """Merge one byte-unicode word by rank; the pieces joined by spaces."""
        if word in self.cache:
            return self.cache[word]
        parts = [*word[:-1], word[-1] + "</w>"]
        while len(parts) > 1:
            pairs = {(a, b) for a, b in zip(parts, parts[1:], strict=False)}
            best = min(pairs, key=lambda p: self.ranks.get(p, float("inf")))
            if best not in self.ranks:
                break
            merged, i = [], 0
            while i < len(parts):
                if i < len(parts) - 1 and (parts[i], parts[i + 1]) == best:
                    merged.append(parts[i] + parts[i + 1])
                    i += 2
                else:
                    merged.append(parts[i])
                    i += 1
            parts = merged
        self.cache[word] = " ".join(parts)
        return self.cache[word]

    def pieces(self, text: str) -> list[str]:
        """The BPE pieces of cleaned ``text`` in byte-unicode form."""
        table = byte_unicode()
        out: list[str] = []
        for word in self.pattern.findall(clean(text)):
            out.extend(self.bpe("".join(table[b] for b in word.encode("utf-8"))).split(" "))
        return out

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text`` without start/end tokens."""
        return [self.encoder[p] for p in self.pieces(text)]

    def __call__(
        self,
        texts: str | Sequence[str],
        context_length: int = CONTEXT_LENGTH,
        truncate: bool = True,
    ) -> np.ndarray:
        """``clip.tokenize``: int32 ``[len(texts), context_length]``, zero-padded."""
        texts = [texts] if isinstance(texts, str) else list(texts)
        out = np.zeros((len(texts), context_length), np.int32)
        for row, text in enumerate(texts):
            ids = [SOT, *self.encode(text), EOT]
            if len(ids) > context_length:
                if not truncate:
                    raise TokenizerError(
                        f"prompt {text[:40]!r}... is {len(ids)} tokens, over the context of {context_length}"
                    )
                ids = ids[:context_length]
                ids[-1] = EOT
            out[row, : len(ids)] = ids
        return out


def token_count(tokenizer: Tokenizer, text: str) -> int:
    """Tokens ``text`` takes, start and end included."""
    return len(tokenizer.encode(text)) + 2


def tokenize_warn(
    tokenizer: Tokenizer, texts: Sequence[str], context_length: int = CONTEXT_LENGTH
) -> np.ndarray:
    """Tokenize with truncation, warning once per prompt that is cut (as the SD references do)."""
    for text in texts:
        n = token_count(tokenizer, text)
        if n > context_length:
            warnings.warn(
                f"prompt {text[:40]!r}... is {n} tokens; truncated to {context_length}",
                stacklevel=2,
            )
    return tokenizer(texts, context_length)


@functools.cache
def default_tokenizer(vocab_path: str | None = None) -> Tokenizer:
    """One tokenizer per vocabulary path (the merges table takes ~0.3 s to build)."""
    return Tokenizer(vocab_path)
