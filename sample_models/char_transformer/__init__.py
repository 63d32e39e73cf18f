"""Character-level decoder-only transformer trained on Python standard-library source code.

The text ships with every Python installation, so nothing is downloaded: a fixed list of pure-Python
stdlib modules, read in that order (``corpus_files``). Patch releases of Python may edit these
files; `corpus_fingerprint` identifies the exact text a checkpoint was trained and measured on.
All projections are ``nn.Linear`` modules (attention is written out rather than taken from
``nn.MultiheadAttention``, which bypasses its submodules), so `hmruntime.patch` can replace them.
"""
from __future__ import annotations

import functools
import hashlib
import math
import sysconfig
from pathlib import Path

import torch
from torch import nn
from torch.nn import functional as F

CHECKPOINT = Path(__file__).with_name("char_transformer.safetensors")
MODULES = ("textwrap", "difflib", "argparse", "inspect", "dataclasses", "functools", "pathlib",
           "subprocess", "shutil", "string", "enum", "fractions", "statistics", "heapq", "random",
           "calendar")
# Vocabulary: newline and printable ASCII; anything else (rare in these files) becomes "?".
ALPHABET = "\n" + "".join(chr(c) for c in range(32, 127))
UNKNOWN = ALPHABET.index("?")
VOCAB = len(ALPHABET)
D_MODEL = 256
HEADS = 4
LAYERS = 2
FF = 512
CONTEXT = 128
VALIDATION_FRACTION = 0.1  # of each file
EVAL_CHARS = 32768  # the first 256 windows of 128 characters of the validation text
METRIC = "val_loss"
HIGHER_IS_BETTER = False


class Block(nn.Module):
    """Pre-norm transformer block: causal self-attention, then a GELU MLP."""

    def __init__(self) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(D_MODEL)
        self.qkv = nn.Linear(D_MODEL, 3 * D_MODEL)
        self.proj = nn.Linear(D_MODEL, D_MODEL)
        self.norm2 = nn.LayerNorm(D_MODEL)
        self.fc1 = nn.Linear(D_MODEL, FF)
        self.fc2 = nn.Linear(FF, D_MODEL)

    def attention(self, x: torch.Tensor) -> torch.Tensor:
        batch, length, _ = x.shape
        q, k, v = self.qkv(x).reshape(batch, length, 3, HEADS, D_MODEL // HEADS).permute(2, 0, 3, 1, 4)
        scores = q @ k.transpose(-1, -2) / math.sqrt(D_MODEL // HEADS)
        future = torch.ones(length, length, dtype=torch.bool, device=x.device).triu(1)
        weights = scores.masked_fill(future, float("-inf")).softmax(-1)
        return self.proj((weights @ v).transpose(1, 2).reshape(batch, length, D_MODEL))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attention(self.norm1(x))
        return x + self.fc2(F.gelu(self.fc1(self.norm2(x))))


class CharTransformer(nn.Module):
    """tokens (batch, length <= CONTEXT) -> next-character logits (batch, length, VOCAB)."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, D_MODEL)
        self.position = nn.Parameter(torch.zeros(CONTEXT, D_MODEL))
        self.blocks = nn.ModuleList(Block() for _ in range(LAYERS))
        self.norm = nn.LayerNorm(D_MODEL)
        self.head = nn.Linear(D_MODEL, VOCAB)
        nn.init.normal_(self.position, std=0.02)
        nn.init.normal_(self.embed.weight, std=0.02)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.embed(tokens) + self.position[: tokens.shape[1]]
        for block in self.blocks:
            x = block(x)
        return self.head(self.norm(x))


def build() -> CharTransformer:
    """The untrained architecture."""
    return CharTransformer()


def corpus_files() -> list[Path]:
    """The stdlib source files of the corpus, in corpus order."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    return [stdlib / f"{name}.py" for name in MODULES]


@functools.lru_cache(maxsize=1)
def corpus() -> tuple[str, ...]:
    """The text of each file of `corpus_files`, non-ASCII characters mapped to '?'."""
    known = set(ALPHABET)
    return tuple("".join(c if c in known else "?" for c in path.read_text(encoding="utf-8"))
                 for path in corpus_files())


def corpus_fingerprint() -> str:
    """SHA-256 of the corpus text (recorded in the checkpoint's metadata)."""
    return hashlib.sha256("".join(corpus()).encode("ascii")).hexdigest()


def encode(text: str) -> torch.Tensor:
    """Characters -> int64 token ids."""
    table = {c: i for i, c in enumerate(ALPHABET)}
    return torch.tensor([table.get(c, UNKNOWN) for c in text], dtype=torch.int64)


@functools.lru_cache(maxsize=1)
def splits() -> tuple[torch.Tensor, torch.Tensor]:
    """(train, validation) token streams: the last 10% of every file is validation text, so both
    come from the same mix of modules."""
    cuts = [int(len(text) * (1 - VALIDATION_FRACTION)) for text in corpus()]
    train = "".join(text[:cut] for text, cut in zip(corpus(), cuts))
    valid = "".join(text[cut:] for text, cut in zip(corpus(), cuts))
    return encode(train), encode(valid)


def validation_windows(count: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Non-overlapping (input, target) windows of CONTEXT characters from the validation text."""
    _, valid = splits()
    usable = min(EVAL_CHARS, (len(valid) - 1) // CONTEXT * CONTEXT)
    windows = usable // CONTEXT if count is None else count
    inputs = valid[: windows * CONTEXT].reshape(windows, CONTEXT)
    targets = valid[1: windows * CONTEXT + 1].reshape(windows, CONTEXT)
    return inputs, targets


@torch.no_grad()
def evaluate(model: nn.Module) -> dict[str, float]:
    """Mean next-character cross-entropy (nats) on EVAL_CHARS validation characters; perplexity."""
    model.eval()
    inputs, targets = validation_windows()
    total = 0.0
    for x, y in zip(inputs.split(64), targets.split(64)):
        total += F.cross_entropy(model(x).reshape(-1, VOCAB), y.reshape(-1), reduction="sum").item()
    loss = total / targets.numel()
    return {"val_loss": loss, "perplexity": math.exp(loss), "bits_per_char": loss / math.log(2)}


CALIBRATION_WINDOWS = 32  # x CONTEXT characters: 4096 input vectors per layer


def calibration_batches() -> list[torch.Tensor]:
    """CALIBRATION_WINDOWS windows of CONTEXT characters spread evenly over the training text
    (never the validation text), in batches of 8: the inputs `hmcompress calibrate` feeds."""
    train, _ = splits()
    starts = torch.linspace(0, len(train) - CONTEXT, CALIBRATION_WINDOWS).long()
    windows = torch.stack([train[start: start + CONTEXT] for start in starts.tolist()])
    return list(windows.split(8))


def sample_inputs(n: int) -> torch.Tensor:
    """The first ``n`` validation windows (token ids, (n, CONTEXT))."""
    return validation_windows(n)[0]


def ntk_output(logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """The function whose NTK is reported: log-probability of each window's last character
    given the ones before it, shape (n, 1). (All logits of all positions would be n x 12288
    outputs; the per-example log-likelihood is the quantity training moves.)"""
    log_probs = logits[:, -2].log_softmax(-1)
    return log_probs.gather(1, tokens[:, -1:])
