"""Compile the regexes of an (untrusted) adapter config with a guard against catastrophic backtracking.

`target_modules="(a+)+$"` -- or any regex whose backtracking is exponential in the module path's
length -- would hang `get_peft_model` / `PeftModel.from_pretrained` on a real model, and
`"q_proj["` raised a bare `re.error`. `compile_config_regex` refuses both with a ConfigError that
names the field and the pattern, before any module is matched.

Refused shapes (the ones that make Python's backtracking engine exponential or high-polynomial):
- longer than MAX_PATTERN_CHARS characters;
- a repeat inside a repeat: `(a+)+`, `(a*)*`, `(\\w+\\.)*`  (star height > 1);
- a repeated alternation whose branches can match the same text: `(a|a)*`, `(a|ab)+`, `(|a)*`;
- three or more unbounded repeats side by side: `.*.*.*`, `\\w+\\w*\\w+` (cubic or worse in the name's
  length; two, as in `.*.*q`, are quadratic on a module path and accepted, as peft accepts them).
Lookahead/lookbehind bodies are checked as patterns of their own (`(?!.*vision)` is fine inside a
repeat). Module paths are dotted names, so realistic target regexes (`.*\\.(q|v)_proj`,
`^(?!.*vision).*(q_proj|k_proj)$`, `model\\.layers\\.\\d+\\.mlp\\..*`) never hit these rules.
"""

from __future__ import annotations

import functools
import re
from typing import Any, Optional

try:  # Python >= 3.11
    from re import _parser as _sre_parse  # type: ignore[attr-defined]
except ImportError:  # pragma: no cover - Python 3.10
    import sre_parse as _sre_parse  # type: ignore[no-redef]

from ..errors import ConfigError

#: Longest regex accepted from a config (peft's own regexes are a few dozen characters).
MAX_PATTERN_CHARS = 1000

_C = _sre_parse
_REPEATS = (_C.MAX_REPEAT, _C.MIN_REPEAT)
_ZERO_WIDTH = (_C.AT, _C.ASSERT, _C.ASSERT_NOT)
_UNKNOWN = None  # a first-character set we do not compute: treated as overlapping everything


class _Unsafe(Exception):
    """Internal: the pattern has a shape that backtracks catastrophically (the message says which)."""


@functools.lru_cache(maxsize=512)
def compile_config_regex(pattern: str, field: str) -> "re.Pattern[str]":
    """`re.compile(pattern)` for the config field `field`, or a ConfigError naming both and the fix."""
    if not isinstance(pattern, str):
        raise ConfigError(f"{field}={pattern!r} is invalid; a regex must be a string.")
    if len(pattern) > MAX_PATTERN_CHARS:
        raise ConfigError(
            f"{field} is a regex of {len(pattern):,} characters, more than the {MAX_PATTERN_CHARS} peftkit accepts "
            "(an untrusted or damaged config?); pass a list of module names instead, or a shorter regex."
        )
    try:
        compiled = re.compile(pattern)
        _check_sequence(_sre_parse.parse(pattern), inside_repeat=False)
    except re.error as exc:
        raise ConfigError(
            f"{field}={pattern!r} is not a valid regex ({exc}); fix the pattern (escape literal characters such as "
            "'[' or '.' with a backslash) or pass a list of module names."
        ) from None
    except _Unsafe as exc:
        raise ConfigError(
            f"{field}={pattern!r} is refused: {exc}, which can take exponential time to match module names. "
            "Rewrite it without nested or overlapping repeats (e.g. r'.*\\.(q_proj|v_proj)') or pass a list of "
            "module names."
        ) from None
    return compiled


def _check_sequence(items: Any, inside_repeat: bool) -> None:
    unbounded_run = 0  # unbounded repeats side by side so far
    for op, av in items:
        unbounded = False
        if op in _REPEATS:
            low, high, body = av
            repeated = high > 1
            unbounded = high == _C.MAXREPEAT
            if repeated and inside_repeat:
                raise _Unsafe("it has a repeat inside a repeat (like '(a+)+')")
            if unbounded and unbounded_run >= 2:
                raise _Unsafe("it has three unbounded repeats side by side (like '.*.*.*')")
            if repeated and _has_ambiguous_branch(body):
                raise _Unsafe("it repeats an alternation whose branches can match the same text (like '(a|a)*')")
            _check_sequence(body, inside_repeat or repeated)
        elif op == _C.SUBPATTERN:
            _check_sequence(av[-1], inside_repeat)
        elif op == _C.BRANCH:
            for alternative in av[1]:
                _check_sequence(alternative, inside_repeat)
        elif op in (_C.ASSERT, _C.ASSERT_NOT):
            _check_sequence(av[1], inside_repeat=False)  # a lookaround is matched on its own
        elif op == getattr(_C, "ATOMIC_GROUP", object()):
            _check_sequence(av, inside_repeat)
        elif op == getattr(_C, "POSSESSIVE_REPEAT", object()):
            _check_sequence(av[2], inside_repeat)  # never backtracks into itself
        elif op == _C.GROUPREF_EXISTS:
            for branch in av[1:]:
                if branch is not None:
                    _check_sequence(branch, inside_repeat)
        if op not in _ZERO_WIDTH:
            unbounded_run = unbounded_run + 1 if unbounded else 0


def _has_ambiguous_branch(items: Any) -> bool:
    """True if `items` (a repeat's body) holds, outside nested repeats, an alternation whose branches
    overlap: one can be empty, or two can start with the same character."""
    for op, av in items:
        if op == _C.SUBPATTERN and _has_ambiguous_branch(av[-1]):
            return True
        if op == _C.BRANCH:
            alternatives = av[1]
            if any(_can_be_empty(alt) for alt in alternatives):
                return True
            firsts = [_first_chars(alt) for alt in alternatives]
            for i, first in enumerate(firsts):
                for other in firsts[i + 1:]:
                    if first is _UNKNOWN or other is _UNKNOWN or first & other:
                        return True
            if any(_has_ambiguous_branch(alt) for alt in alternatives):
                return True
    return False


def _can_be_empty(items: Any) -> bool:
    for op, av in items:
        if op in _ZERO_WIDTH:
            continue
        if op in _REPEATS and (av[0] == 0 or _can_be_empty(av[2])):
            continue
        if op == _C.SUBPATTERN and _can_be_empty(av[-1]):
            continue
        if op == _C.BRANCH and any(_can_be_empty(alt) for alt in av[1]):
            continue
        return False
    return True


def _first_chars(items: Any) -> Optional[frozenset]:
    """The characters a match of `items` can start with, or _UNKNOWN."""
    for op, av in items:
        if op in _ZERO_WIDTH:
            continue
        if op == _C.LITERAL:
            return frozenset([av])
        if op == _C.IN and all(kind == _C.LITERAL for kind, _ in av):
            return frozenset(value for _, value in av)
        if op == _C.SUBPATTERN:
            return _first_chars(av[-1])
        return _UNKNOWN
    return _UNKNOWN
