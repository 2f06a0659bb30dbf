"""The ResNets' layout, without JAX: the Flax model (models/resnet.py), the official checkpoint
reader (official/) and the JAX-free exporters (export/) read the same facts from here."""

STAGE_NAMES: tuple[str, ...] = (
    "stem",
    "block_group1",
    "block_group2",
    "block_group3",
    "block_group4",
)
BLOCKS_PER_GROUP: dict[int, tuple[int, int, int, int]] = {
    18: (2, 2, 2, 2),
    34: (3, 4, 6, 3),
    50: (3, 4, 6, 3),
    101: (3, 4, 23, 3),
    152: (3, 8, 36, 3),
    200: (3, 24, 36, 3),
}
BOTTLENECK_DEPTHS = frozenset({50, 101, 152, 200})  # the others use basic blocks
GROUP_STRIDES = (1, 2, 2, 2)
