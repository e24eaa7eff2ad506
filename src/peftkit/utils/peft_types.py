"""The method and task enums, spelled exactly as in Hugging Face peft.

Both are `str` enums, so `TaskType.CAUSAL_LM == "CAUSAL_LM"` and the values serialise to
JSON as plain strings (`"peft_type": "LORA"` in `adapter_config.json`).
"""

from __future__ import annotations

import enum


class PeftType(str, enum.Enum):
    """Which parameter-efficient method an adapter uses."""

    LORA = "LORA"
    ADALORA = "ADALORA"
    IA3 = "IA3"
    LOHA = "LOHA"
    LOKR = "LOKR"
    PROMPT_TUNING = "PROMPT_TUNING"
    PREFIX_TUNING = "PREFIX_TUNING"
    P_TUNING = "P_TUNING"
    MULTITASK_PROMPT_TUNING = "MULTITASK_PROMPT_TUNING"
    CPT = "CPT"
    CARTRIDGE = "CARTRIDGE"
    BOTTLENECK = "BOTTLENECK"
    OFT = "OFT"
    BOFT = "BOFT"
    HRA = "HRA"
    ROAD = "ROAD"
    PSOFT = "PSOFT"
    VERA = "VERA"
    PVERA = "PVERA"
    VBLORA = "VBLORA"
    RANDLORA = "RANDLORA"
    UNILORA = "UNILORA"
    TINYLORA = "TINYLORA"
    FOURIERFT = "FOURIERFT"
    WAVEFT = "WAVEFT"
    C3A = "C3A"
    HIRA = "HIRA"
    MISS = "MISS"
    OSF = "OSF"
    LN_TUNING = "LN_TUNING"
    DEFT = "DEFT"
    GRALORA = "GRALORA"
    GLORA = "GLORA"
    BEFT = "BEFT"
    DELORA = "DELORA"
    LILY = "LILY"
    SHIRA = "SHIRA"
    PEANUT = "PEANUT"
    FROD = "FROD"
    SUPERTUNING = "SUPERTUNING"
    TRAINABLE_TOKENS = "TRAINABLE_TOKENS"
    ADAMSS = "ADAMSS"
    XLORA = "XLORA"
    POLY = "POLY"
    ADAPTION_PROMPT = "ADAPTION_PROMPT"
    SHADOW = "SHADOW"

    def __str__(self) -> str:
        return self.value


class TaskType(str, enum.Enum):
    """Which task wrapper (`PeftModelFor...`) a model gets."""

    SEQ_CLS = "SEQ_CLS"
    SEQ_2_SEQ_LM = "SEQ_2_SEQ_LM"
    CAUSAL_LM = "CAUSAL_LM"
    TOKEN_CLS = "TOKEN_CLS"
    QUESTION_ANS = "QUESTION_ANS"
    FEATURE_EXTRACTION = "FEATURE_EXTRACTION"

    def __str__(self) -> str:
        return self.value
