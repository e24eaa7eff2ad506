"""TRL with peftkit: TRL's trainers work as they do with peft, user code unchanged (tested with trl 1.16).

`import peftkit` teaches TRL's modules peftkit's classes (`recognition.py`): `peft_config=<peftkit
config>` makes the trainer wrap the model with peftkit, a peftkit model is treated as a peft model
(the fused LM head goes on the transformers model inside, preference trainers use the adapter
disabled as their reference model), and checkpoints hold the adapter only.

`PeftkitSFTTrainer` is kept as a name for code written against earlier peftkit versions: it is
`trl.SFTTrainer` itself now.
"""

from __future__ import annotations

from trl import SFTTrainer


class PeftkitSFTTrainer(SFTTrainer):
    """`trl.SFTTrainer` (kept name): SFTTrainer handles peftkit models and configs since `import peftkit`."""
