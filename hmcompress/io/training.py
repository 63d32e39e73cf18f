"""Training checkpoints: which of their tensors a compressed file keeps, and under which names.

A training script saves more than the model: ``{"model": state_dict, "optimizer": ..., "epoch":
3}`` (nanoGPT, most loops), ``{"state_dict": ..., "optimizer_states": [...]}`` (Lightning). By
default every tensor is kept (optimizer state passes through uncompressed). ``drop_optimizer``
leaves optimizer state out of the file; ``model_only`` keeps the model's state dict alone, under
the names the bare model uses (its ``model.`` prefix removed, and a ``_orig_mod.`` left by
``torch.compile`` or a ``module.`` left by DataParallel), so that ``hmruntime.patch(build(),
file)`` needs no option.
"""
from __future__ import annotations

import dataclasses

from hmcompress.errors import UserError
from hmcompress.io.checkpoint import TensorEntry, is_optimizer_state

# Keys under which training scripts keep the model's state dict, most specific first.
MODEL_KEYS = ("model_state_dict", "state_dict", "model", "net", "network")
# Other parts of a training checkpoint that --model-only may leave out (beside optimizer state).
TRAINING_PARTS = frozenset({"ema", "model_ema", "ema_model", "ema_state_dict", "scaler", "grad_scaler",
                            "loss_scaler", "lr_scheduler", "scheduler", "lr_schedulers", "rng_state"})
# Prefixes wrappers add to every name of a state dict.
WRAPPER_PREFIXES = ("_orig_mod.", "module.")
DROPPED_OPTIMIZER = "optimizer state (--drop-optimizer)"
DROPPED_NOT_MODEL = "not part of the model (--model-only)"


@dataclasses.dataclass(frozen=True)
class Keep:
    """The tensors a compressed file keeps: source name -> output name, and why the rest go."""

    names: dict[str, str]
    dropped: dict[str, str]  # source name -> reason
    prefix: str = ""  # what was removed from every kept name ("" if nothing)

    def summary(self) -> dict:
        """For the file's header and the JSON: what was dropped (counted by reason) and renamed."""
        reasons: dict[str, int] = {}
        for reason in self.dropped.values():
            reasons[reason] = reasons.get(reason, 0) + 1
        return {"dropped": dict(sorted(reasons.items())), "removed_prefix": self.prefix}


def keep(entries: list[TensorEntry], drop_optimizer: bool = False, model_only: bool = False,
         source: object = "checkpoint") -> Keep:
    """Which entries to keep and how to name them (see the module docstring)."""
    names = [e.name for e in entries]
    dropped: dict[str, str] = {}
    if drop_optimizer or model_only:
        dropped = {n: DROPPED_OPTIMIZER for n in names if is_optimizer_state(n)}
    prefix = ""
    if model_only:
        prefix = _model_prefix([n for n in names if n not in dropped])
        others = [n for n in names if n not in dropped and not n.startswith(prefix)]
        # A dotted name outside the model is some module's parameter (a bare state dict's
        # `lm_head.weight`), unless it belongs to known training state; undotted ones are the
        # training loop's own numbers (`best_val_loss`).
        strangers = [n for n in others if "." in n and n.split(".")[0] not in TRAINING_PARTS]
        if strangers:
            raise UserError(f"{source}: --model-only: {strangers[0]!r} lies outside the model's state dict "
                            f"({prefix or 'none found'}) and is no known training state; this looks like a "
                            "bare state dict, which needs no --model-only")
        dropped |= {n: DROPPED_NOT_MODEL for n in others}
        kept = [n for n in names if n not in dropped]
        wrapper = next((w for w in WRAPPER_PREFIXES if kept and all(n[len(prefix):].startswith(w) for n in kept)), "")
        prefix += wrapper
    renamed = {n: n[len(prefix):] for n in names if n not in dropped}
    if not renamed:
        reasons = ", ".join(sorted(set(dropped.values()))) or "none were found"
        raise UserError(f"{source}: no tensor is left to keep ({reasons})")
    return Keep(renamed, dropped, prefix)


def _model_prefix(names: list[str]) -> str:
    """``"model."`` where the model's state dict sits under a known key; else "" (a bare state dict)."""
    for key in MODEL_KEYS:
        if any(n.startswith(key + ".") for n in names):
            return key + "."
    return ""
