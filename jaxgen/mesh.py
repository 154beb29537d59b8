"""Device meshes: parsing `data=2,model=3`, checking it against the devices, and building the `jax.sharding.Mesh`.

Every mesh has the two axes `data` (engine slots, i.e. batch rows) and `model` (attention heads, MLP columns,
the vocabulary), an absent one of size 1; one device is the trivial mesh data=1 × model=1, so a single device
runs the same sharded code. Whether a model fits a mesh (heads per shard) is `models.sharding.layout_for`'s
check.
"""
from __future__ import annotations

import math
from typing import Mapping, Sequence

import jax
import numpy as np
from jax.sharding import Mesh

AXES = ("data", "model")


class MeshError(ValueError):
    """A mesh that cannot be built: bad syntax, an unknown axis, more devices than exist."""


def parse_mesh(text: str) -> dict[str, int]:
    """`"data=2,model=3"` -> {"data": 2, "model": 3}; axes not named are 1."""
    sizes = dict.fromkeys(AXES, 1)
    seen = set()
    for part in (p.strip() for p in text.split(",")):
        name, sep, value = part.partition("=")
        name = name.strip()
        if not sep or not value.strip().isdigit():
            raise MeshError(f"mesh {text!r}: expected AXIS=SIZE[,AXIS=SIZE] (axes {', '.join(AXES)}), got {part!r}")
        if name not in AXES:
            raise MeshError(f"mesh {text!r}: unknown axis {name!r}; the axes are {', '.join(AXES)}")
        if name in seen:
            raise MeshError(f"mesh {text!r}: axis {name!r} is given twice")
        seen.add(name)
        sizes[name] = int(value)
        if sizes[name] < 1:
            raise MeshError(f"mesh {text!r}: axis {name} must have size >= 1, not {sizes[name]}")
    return sizes


def describe(sizes: Mapping[str, int]) -> str:
    """`data=2,model=3`, the form `parse_mesh` reads."""
    return ",".join(f"{a}={sizes[a]}" for a in AXES)


def make_mesh(mesh: "str | Mapping[str, int] | Mesh | None" = None, devices: Sequence | None = None) -> Mesh:
    """The Mesh(("data", "model")) of `mesh` (a string, {axis: size}, a Mesh with those axis names, or None for
    one device) over the first data·model of `devices` (default: every device JAX sees, all processes')."""
    if isinstance(mesh, Mesh):
        if tuple(mesh.axis_names) != AXES:
            raise MeshError(f"a mesh needs the axes {AXES}, not {tuple(mesh.axis_names)}")
        return mesh
    sizes = parse_mesh(mesh) if isinstance(mesh, str) else dict.fromkeys(AXES, 1) | dict(mesh or {})
    unknown = set(sizes) - set(AXES)
    if unknown:
        raise MeshError(f"unknown mesh axes {sorted(unknown)}; the axes are {', '.join(AXES)}")
    devices = list(jax.devices() if devices is None else devices)
    needed = math.prod(sizes[a] for a in AXES)
    if needed > len(devices):
        raise MeshError(f"mesh {describe(sizes)} needs {needed} devices (data {sizes['data']} × model "
                        f"{sizes['model']}), but {len(devices)} exist")
    if jax.process_count() > 1 and needed != len(devices):
        raise MeshError(f"mesh {describe(sizes)} uses {needed} devices, but the {jax.process_count()} processes "
                        f"serving together hold {len(devices)}: their mesh must use them all")
    grid = np.asarray(devices[:needed], dtype=object).reshape(sizes["data"], sizes["model"])
    return Mesh(grid, AXES)
