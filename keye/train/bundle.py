"""A trained checkpoint carries what is needed to use it: the tokenizer and the frame-sampling policy it was
trained with, so generation and evaluation build prompts exactly as training did."""

from __future__ import annotations

import shutil
from pathlib import Path

from keye.core.atomic import atomic_write_text
from keye.data.sampling import SamplingPolicy
from keye.data.tokenizer import KeyeTokenizer
from keye.model import integrity

POLICY_FILE = "sampling_policy.json"


def bundle_checkpoint(
    checkpoint_dir: Path, tokenizer_dir: Path, policy: SamplingPolicy, tok: KeyeTokenizer | None = None
) -> None:
    """Save the tokenizer (`tok`, and any other file of its directory) and write the policy beside the weights.
    The trainer calls it once, on final/ before it is renamed into place."""
    checkpoint_dir = Path(checkpoint_dir)
    if tok is not None:
        tok.save(checkpoint_dir)
    added = []
    for f in sorted(Path(tokenizer_dir).iterdir()):
        if f.is_file() and not (checkpoint_dir / f.name).exists():
            tmp = checkpoint_dir / f".{f.name}.partial"
            shutil.copyfile(f, tmp)
            tmp.replace(checkpoint_dir / f.name)
            added.append(f.name)
    atomic_write_text(checkpoint_dir / POLICY_FILE, policy.model_dump_json(indent=2))
    integrity.add_checksums(checkpoint_dir, [*added, POLICY_FILE])  # readers check these files too
