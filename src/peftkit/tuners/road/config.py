"""`RoadConfig`: fields, defaults and validation of RoAd (2-D rotation adaptation), as in Hugging Face peft."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Optional, Union

from ...config import PeftConfig
from ...errors import ConfigError
from ...utils.peft_types import PeftType
from ...utils.validation import as_name_set, check_bool, check_optional_name_list, check_size_bound

RoadVariant = Literal["road_1", "road_2", "road_4"]
VARIANTS: tuple[str, ...] = ("road_1", "road_2", "road_4")


@dataclass
class RoadConfig(PeftConfig):
    """Configuration of a RoAd adapter: the base layer's output is rotated pair by pair, `y = R (W x + b)`.

    Args:
        variant: How many scales / angles each pair of output elements gets: "road_1" one angle and
            one scale per pair (out / 2 of each), "road_2" one per element (out), "road_4" two per
            element (2 * out: separate ones for the cosine and the sine terms).
        group_size: Elements are paired inside groups of this size: element k with element
            k + group_size / 2. Must be even and divide every target's out_features (64 is peft's
            default; small models need a smaller value).
        init_weights: True starts every angle at 0 and every scale at 1 (R = I, a no-op); False
            draws angles from N(0, 0.5^2) and scales from N(1, 0.5^2) (for tests).
        target_modules: Module names (suffix match), a regex over full paths, or "all-linear".
            None picks the query/value projections of known architectures.
        modules_to_save: Modules trained in full and saved with the adapter (e.g. a classifier).
    """

    peft_type: Optional[Union[str, PeftType]] = PeftType.ROAD
    variant: Union[str, RoadVariant] = field(default="road_1", metadata={"help": "road_1, road_2 or road_4"})
    group_size: int = field(default=64, metadata={"help": "Size of the groups whose halves are paired"})
    init_weights: bool = field(default=True, metadata={"help": "True: the new adapter is a no-op"})
    target_modules: Optional[Union[list[str], str]] = field(default=None, metadata={"help": "Modules to wrap"})
    modules_to_save: Optional[list[str]] = field(default=None, metadata={"help": "Fully trained modules"})

    def __post_init__(self) -> None:
        super().__post_init__()
        if str(self.peft_type) != PeftType.ROAD.value:
            raise ConfigError(f"RoadConfig has peft_type {self.peft_type!r}; it must be 'ROAD'.")
        self.peft_type = PeftType.ROAD
        self.target_modules = as_name_set(self.target_modules)
        if self.variant not in VARIANTS:
            raise ConfigError(
                f"Invalid variant {self.variant} specified. Please choose from road_1, road_2 or road_4"
            )
        size = self.group_size
        if isinstance(size, bool) or not isinstance(size, int) or size <= 0 or size % 2 != 0:
            raise ConfigError(
                f"The group_size must be divisible by 2 when using RoadLayer, but got {size}."
                " Pass a positive even integer such as 64 (it must divide the targets' out_features)."
            )
        check_size_bound(size, "group_size")
        check_bool(self.init_weights, "init_weights")
        self.modules_to_save = check_optional_name_list(self.modules_to_save, "modules_to_save")
