"""The tiny model family ("zoo"): base, instruction-tuned and reasoning Qwen2 models built from params."""

from rain_tasks.zoo.build import build_zoo
from rain_tasks.params import ZooParams

__all__ = ["ZooParams", "build_zoo"]
