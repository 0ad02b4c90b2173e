"""TPU slices for ahead-of-time compilation on a host with no TPU: slice names (v5p-8, v5e-16, ...) and libtpu's
topologies, the libtpu pin of the installed jax, and the devices XLA compiles for (design §9)."""

from __future__ import annotations

import dataclasses
import importlib.metadata
import math
import os

import jax

TPU_INSTALL = 'pip install -r requirements-tpu.txt   (or: pip install "jax[tpu]=={jax}")'


@dataclasses.dataclass(frozen=True)
class Topology:
    """A TPU slice as libtpu describes it for ahead-of-time compilation."""

    name: str  # what the user typed: a slice name (v5p-8) or a raw topology (v5p:2x2x1)
    topology_name: str  # libtpu's: <generation>:<chips per dimension>
    chips_per_host_bounds: tuple[int, int, int] | None = None  # chips of one host; None: libtpu's default (2x2x1)
    chip_config_name: str | None = None  # 'megacore': one jax device per chip with both TensorCores (v4, v5p)

    @property
    def device_kind(self) -> str:
        """jax's device kind of the slice's chips (known without libtpu)."""
        return _DEVICE_KINDS[self.topology_name.split(":")[0]]

    @property
    def chips(self) -> int:
        """Chips of the slice, one jax device each (megacore on v4 and v5p)."""
        return math.prod(int(n) for n in self.topology_name.split(":")[1].split("x"))


# v4 and v5p slice names count TensorCores (2 per chip) and their chips form a 3-D torus; v5e and v6e
# names count chips on a 2-D grid, up to 8 on one host (v5e-8, v6e-8), else hosts of 2x2 chips.
_CUBES = {4: "2x2x1", 8: "2x2x2", 16: "2x2x4", 32: "2x4x4", 64: "4x4x4", 128: "4x4x8", 256: "4x8x8"}
_GRIDS = {1: "1x1", 4: "2x2", 8: "2x4", 16: "4x4", 32: "4x8", 64: "8x8", 128: "8x16", 256: "16x16"}
_ONE_HOST = {1: (1, 1, 1), 4: (2, 2, 1), 8: (2, 4, 1)}


def _slices() -> dict[str, Topology]:
    out = {}
    for generation in ("v4", "v5p"):
        for chips, shape in _CUBES.items():
            name = f"{generation}-{2 * chips}"
            out[name] = Topology(name, f"{generation}:{shape}", None, "megacore")
    for generation in ("v5e", "v6e"):
        for chips, shape in _GRIDS.items():
            name = f"{generation}-{chips}"
            out[name] = Topology(name, f"{generation}:{shape}", _ONE_HOST.get(chips, (2, 2, 1)))
    return out


TOPOLOGIES: dict[str, Topology] = _slices()
_DEVICE_KINDS = {"v4": "TPU v4", "v5p": "TPU v5", "v5": "TPU v5", "v5e": "TPU v5 lite", "v6e": "TPU v6 lite"}
_ALIASES = {"v5litepod-": "v5e-", "v6litepod-": "v6e-"}  # Cloud's accelerator-type spellings


def topology(name: str) -> Topology:
    """A slice name (v4-8, v5e-16, v5p-8, v6e-8, v5litepod-16, ...) or a raw libtpu topology (v5e:2x2)."""
    name = name.strip()
    for alias, canonical in _ALIASES.items():
        if name.startswith(alias):
            name = canonical + name[len(alias):]
    if name in TOPOLOGIES:
        return TOPOLOGIES[name]
    if ":" in name:
        generation = name.split(":")[0]
        return Topology(name, name, None, "megacore" if generation in ("v4", "v5p") else None)
    raise ValueError(f"unknown TPU topology {name!r}; known slice names: {', '.join(TOPOLOGIES)}; "
                     "or pass a raw libtpu topology such as v5e:2x2 or v5p:2x2x1")


def libtpu_requirement() -> str:
    """The libtpu version specifier that the installed jax pins for its [tpu] extra (e.g. '==0.0.42.*')."""
    from packaging.requirements import Requirement

    for line in importlib.metadata.requires("jax") or ():
        req = Requirement(line)
        if req.name == "libtpu" and req.marker is not None and req.marker.evaluate({"extra": "tpu"}):
            return str(req.specifier)
    raise RuntimeError(f"jax {jax.__version__}'s metadata names no libtpu for its [tpu] extra")


def check_libtpu() -> str:
    """The installed libtpu version; raises with the install command when it is missing or not jax's pin."""
    from packaging.specifiers import SpecifierSet

    install = TPU_INSTALL.format(jax=jax.__version__)
    required = libtpu_requirement()
    try:
        installed = importlib.metadata.version("libtpu")
    except importlib.metadata.PackageNotFoundError:
        raise RuntimeError(f"libtpu is not installed: compiling for a TPU topology needs libtpu{required} "
                           f"(the pin of jax {jax.__version__}). Install it with: {install}") from None
    if installed not in SpecifierSet(required):
        raise RuntimeError(f"libtpu {installed} is installed, but jax {jax.__version__} pins libtpu{required}; "
                           f"a mismatched libtpu compiles for the wrong runtime. Install the pin with: {install}")
    return installed


def topology_devices(name: str) -> list[jax.Device]:
    """The devices of a TPU topology, to compile for on this host (which needs no TPU, only libtpu)."""
    topo = topology(name)
    check_libtpu()
    # libtpu takes a host-wide lock file unless told otherwise; compiling needs no chip, so a pre-flight can run
    # beside another one (or beside a run on this host's own TPU).
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    from jax.experimental import topologies

    kwargs = {k: v for k, v in (("chips_per_host_bounds", topo.chips_per_host_bounds),
                                ("chip_config_name", topo.chip_config_name)) if v is not None}
    try:
        return list(topologies.get_topology_desc(platform="tpu", topology_name=topo.topology_name, **kwargs).devices)
    except Exception as e:  # libtpu's own message (an invalid name, a generation it does not know)
        raise ValueError(f"libtpu refused topology {topo.topology_name!r} ({name}): {e}. Known slice names: "
                         f"{', '.join(TOPOLOGIES)}") from e
