"""A build is data: one recipe says everything that decides the package, and goes into its manifest."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field


@dataclass(frozen=True)
class BuildRecipe:
    source: str  # model.onnx | program.pt2 | file.py:fn | zoo:NAME
    target: str = "host"  # name, .toml path or inline JSON; resolved name is in the manifest
    backend: str = "default"  # default: the target's first backend; auto: every allowed one, keep the fastest correct
    input_shapes: dict[str, list[int]] = field(default_factory=dict)
    pipeline: str = "default"  # TVM CPU pipeline (edgellm/backends/tvm_pipelines.py)
    tolerance: float = 1e-4  # max |error| vs the fp32 reference, relative to the output scale
    precision: str = "fp32"  # fp16: GPU targets compute in half precision (fp32 accumulation)

    def to_dict(self) -> dict:
        return asdict(self)
