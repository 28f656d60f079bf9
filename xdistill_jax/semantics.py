"""Class groupings: Cityscapes' 19 trainIds regrouped into the groups the translator predicts.

X-Distill regroups the teacher's classes into groups whose members share geometric character,
so that a depth map can predict them. A grouping is data (`Grouping`): an ordered tuple of group
names and, for each of the teacher's classes, the group it belongs to. Three are built in:

- ``"geometric"`` (default, DESIGN.md): ground {road, sidewalk, terrain}; structure {building,
  wall, fence}; thin {pole, traffic light, traffic sign}; vegetation; sky; people and
  two-wheelers {person, rider, motorcycle, bicycle}; vehicles {car, truck, bus, train}.
- ``"cityscapes_categories"``: Cityscapes' own 7 categories (flat, construction, object,
  nature, sky, human, vehicle), restricted to the 19 trainIds.
- ``"none"`` (alias ``"classes19"``): the 19 classes ungrouped.

Logits are grouped by log-sum-exp over member logits: with p_c = softmax(logits)_c,
``softmax(group_logits)_g = sum_{c in g} p_c`` exactly, because the softmax normaliser is shared.
Labels keep 255 as the ignore value.
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
import numpy as np

IGNORE_INDEX = 255

# Cityscapes trainId order (trainIds 0..18).
CITYSCAPES_CLASSES: tuple[str, ...] = (
    "road", "sidewalk", "building", "wall", "fence", "pole", "traffic light", "traffic sign",
    "vegetation", "terrain", "sky", "person", "rider", "car", "truck", "bus", "train",
    "motorcycle", "bicycle",
)


@dataclasses.dataclass(frozen=True)
class Grouping:
    """A map from the teacher's C classes to G groups.

    Attributes:
      name: the registry name.
      group_names: G names, in group-id order.
      class_to_group: C ints, ``class_to_group[c]`` is the group id of teacher class c.
      class_names: C names of the teacher's classes, in class-id order.
    """

    name: str
    group_names: tuple[str, ...]
    class_to_group: tuple[int, ...]
    class_names: tuple[str, ...] = CITYSCAPES_CLASSES

    def __post_init__(self):
        if len(self.class_to_group) != len(self.class_names):
            raise ValueError(f"grouping {self.name!r}: {len(self.class_to_group)} class entries "
                             f"for {len(self.class_names)} class names")
        used = set(self.class_to_group)
        if used != set(range(len(self.group_names))):
            raise ValueError(f"grouping {self.name!r}: group ids used {sorted(used)} must be "
                             f"exactly 0..{len(self.group_names) - 1}")

    @property
    def num_classes(self) -> int:
        return len(self.class_to_group)

    @property
    def num_groups(self) -> int:
        return len(self.group_names)

    def membership(self) -> np.ndarray:
        """(C, G) float32 0/1 matrix, 1 where class c belongs to group g."""
        m = np.zeros((self.num_classes, self.num_groups), np.float32)
        m[np.arange(self.num_classes), np.asarray(self.class_to_group)] = 1.0
        return m

    def label_lookup(self) -> np.ndarray:
        """(256,) uint8 table mapping a trainId label to a group id; 255 and unknown ids -> 255."""
        table = np.full((256,), IGNORE_INDEX, np.uint8)
        table[: self.num_classes] = np.asarray(self.class_to_group, np.uint8)
        return table


def _from_members(name: str, groups: dict[str, tuple[str, ...]]) -> Grouping:
    class_to_group = [-1] * len(CITYSCAPES_CLASSES)
    for gid, members in enumerate(groups.values()):
        for cls in members:
            class_to_group[CITYSCAPES_CLASSES.index(cls)] = gid
    missing = [CITYSCAPES_CLASSES[c] for c, g in enumerate(class_to_group) if g < 0]
    if missing:  # a programming error in the tables below
        raise AssertionError(f"grouping {name!r} leaves classes ungrouped: {missing}")
    return Grouping(name, tuple(groups), tuple(class_to_group))


GEOMETRIC = _from_members("geometric", {
    "ground": ("road", "sidewalk", "terrain"),
    "structure": ("building", "wall", "fence"),
    "thin": ("pole", "traffic light", "traffic sign"),
    "vegetation": ("vegetation",),
    "sky": ("sky",),
    "people_two_wheelers": ("person", "rider", "motorcycle", "bicycle"),
    "vehicles": ("car", "truck", "bus", "train"),
})

CITYSCAPES_CATEGORIES = _from_members("cityscapes_categories", {
    "flat": ("road", "sidewalk"),
    "construction": ("building", "wall", "fence"),
    "object": ("pole", "traffic light", "traffic sign"),
    "nature": ("vegetation", "terrain"),
    "sky": ("sky",),
    "human": ("person", "rider"),
    "vehicle": ("car", "truck", "bus", "train", "motorcycle", "bicycle"),
})

CLASSES19 = Grouping("none", CITYSCAPES_CLASSES, tuple(range(len(CITYSCAPES_CLASSES))))

GROUPINGS: dict[str, Grouping] = {
    "geometric": GEOMETRIC,
    "cityscapes_categories": CITYSCAPES_CATEGORIES,
    "none": CLASSES19,
    "classes19": CLASSES19,
}


def get_grouping(grouping: str | Grouping) -> Grouping:
    """Looks a grouping up by name (a `Grouping` passes through)."""
    if isinstance(grouping, Grouping):
        return grouping
    try:
        return GROUPINGS[grouping]
    except (KeyError, TypeError):
        raise ValueError(f"unknown class grouping {grouping!r}; known groupings: "
                         f"{', '.join(sorted(GROUPINGS))}") from None


def _check_classes(num_classes: int, grouping: Grouping, what: str) -> None:
    if num_classes != grouping.num_classes:
        raise ValueError(
            f"{what} has {num_classes} classes but grouping {grouping.name!r} expects "
            f"{grouping.num_classes} teacher classes ({', '.join(grouping.class_names[:3])}, ...); "
            "use a teacher with the Cityscapes 19 trainIds or reorder its classes")


def group_logits(logits, grouping: str | Grouping = "geometric"):
    """Groups teacher class logits (..., C) into group logits (..., G).

    ``out_g = logsumexp_{c in g} logits_c`` computed in float32, so that
    ``softmax(out) == softmax(logits) @ membership`` (probabilities of members summed).
    Works on numpy or jax arrays; returns a jax array.
    """
    g = get_grouping(grouping)
    logits = jnp.asarray(logits)
    _check_classes(logits.shape[-1], g, "teacher logits (last axis)")
    x = logits.astype(jnp.float32)
    member = jnp.asarray(g.membership())  # (C, G)
    # Masked log-sum-exp: subtract the per-group max of members for stability.
    masked = jnp.where(member > 0, x[..., :, None], -jnp.inf)  # (..., C, G)
    gmax = jnp.max(masked, axis=-2)  # (..., G)
    summed = jnp.sum(jnp.where(member > 0, jnp.exp(masked - gmax[..., None, :]), 0.0), axis=-2)
    return gmax + jnp.log(summed)


def group_logits_np(logits: np.ndarray, grouping: str | Grouping = "geometric") -> np.ndarray:
    """numpy twin of `group_logits` (float32 out), for data pipelines that avoid jax."""
    g = get_grouping(grouping)
    _check_classes(logits.shape[-1], g, "teacher logits (last axis)")
    x = np.asarray(logits, np.float32)
    out = np.empty(x.shape[:-1] + (g.num_groups,), np.float32)
    cls = np.asarray(g.class_to_group)
    for gid in range(g.num_groups):
        members = x[..., cls == gid]
        m = members.max(axis=-1, keepdims=True)
        out[..., gid] = (m + np.log(np.exp(members - m).sum(axis=-1, keepdims=True)))[..., 0]
    return out


def group_labels(labels, grouping: str | Grouping = "geometric"):
    """Maps trainId labels (any integer shape) to group ids; 255 stays 255 (ignore).

    numpy in -> numpy uint8 out, and a label outside 0..C-1 that is not 255 is a ValueError.
    jax in -> jax int32 out; inside jit nothing can raise, so such labels map to 255 (ignored).
    """
    g = get_grouping(grouping)
    table = g.label_lookup()
    if isinstance(labels, np.ndarray) or np.isscalar(labels):
        lab = np.asarray(labels)
        bad = (lab != IGNORE_INDEX) & ((lab < 0) | (lab >= g.num_classes))
        if bad.any():
            raise ValueError(f"labels contain values {sorted(set(np.unique(lab[bad]).tolist()))} "
                             f"outside trainIds 0..{g.num_classes - 1} and ignore {IGNORE_INDEX}")
        return table[lab.astype(np.int64)]
    lab = jnp.asarray(labels).astype(jnp.int32)
    # the table maps 0..255 (C..254 -> 255); a label outside 0..255 is out of range too, and
    # clipping alone would map a negative one to class 0's group
    inside = (lab >= 0) & (lab <= IGNORE_INDEX)
    return jnp.where(inside, jnp.asarray(table, jnp.int32)[jnp.clip(lab, 0, IGNORE_INDEX)], IGNORE_INDEX)
