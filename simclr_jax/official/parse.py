"""An official checkpoint's variable list, sorted into layers; what is not the model set aside.

Works on names and shapes only (a `{key: shape}` dict), so layouts can be checked without TF.

TF1 (the Estimator code that made the released `model.ckpt-N`): `base_model/conv2d[_N]/kernel`,
`base_model/batch_normalization[_N]/{gamma,beta,moving_mean,moving_variance}` (N = creation
counter), `head_contrastive/nl_j/...` (`l_0` for a linear head), `head_supervised/linear_layer/
dense/{kernel,bias}`. TF2 SavedModels (`variables/variables`) carry no layer names:
`trainable_variables_list/<i>` in `model.trainable_variables` order (each conv kernel followed by
its BN's gamma and beta; in the head each layer's BN gamma/beta come before its dense kernel;
the classifier's kernel and bias last), and the BN moving statistics under
`model/resnet_model/variables/<j>` and `model/_projection_head/variables/<k>` in layer order.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping

Shape = tuple[int, ...]
# TF batch-norm variable -> our BatchNorm's name ('params' for scale/bias, 'batch_stats' for the rest)
BN_ROLES = {"gamma": "scale", "beta": "bias", "moving_mean": "mean", "moving_variance": "var"}
EMA_PREFIX = "ema_model/"
_MAX_LISTED = 20


class ConversionError(ValueError):
    """The checkpoint cannot be read into our model; the message names the variables at fault."""


@dataclasses.dataclass
class Parsed:
    """Checkpoint keys grouped by the layer they belong to, in official creation order."""

    kind: str  # 'tf1' or 'tf2'
    shapes: dict[str, Shape]  # every key of the checkpoint
    convs: list[str]  # backbone conv kernels
    norms: list[dict[str, str]]  # backbone BNs: {'scale', 'bias', 'mean', 'var'} -> key
    head: list[dict[str, str]]  # head layers: {'kernel', 'scale', ['bias',] 'mean', 'var'} -> key
    head_mode: str  # 'none', 'linear' or 'nonlinear'
    classifier: dict[str, str] | None  # {'kernel', 'bias'} -> key
    ignored: list[tuple[str, str]]  # (key, why it is not part of the model)
    trained_scopes: frozenset[str]  # TF1 scopes that have optimizer slots (what was trained)
    step_key: str | None  # 'global_step'


def listing(title: str, lines: list[str]) -> str:
    """`title` and up to 20 indented lines (then a count of the rest)."""
    shown = [f"  {line}" for line in lines[:_MAX_LISTED]]
    if len(lines) > _MAX_LISTED:
        shown.append(f"  ... and {len(lines) - _MAX_LISTED} more")
    return "\n".join([title, *shown])


def parse(shapes: Mapping[str, Shape], kind: str, *, ema: bool = False) -> Parsed:
    """Sort a TF1 ('tf1') or TF2 SavedModel ('tf2') variable list; `ema` reads the EMA copy."""
    shapes = {key: tuple(int(d) for d in shape) for key, shape in shapes.items()}
    if kind == "tf1":
        return _parse_tf1(shapes, ema=ema)
    if kind == "tf2":
        if ema:
            raise ConversionError("--ema: TF2 SavedModels hold one copy of the network")
        return _parse_tf2(shapes)
    raise ValueError(f"kind must be 'tf1' or 'tf2', got {kind!r}")


# ------------------------------------------------------------------------------------------- TF1

_CONV = re.compile(r"base_model/conv2d(?:_(\d+))?/kernel")
_BN = re.compile(
    r"base_model/batch_normalization(?:_(\d+))?/(gamma|beta|moving_mean|moving_variance)"
)
_HEAD = re.compile(
    r"head_contrastive/(?:nl_(\d+)|(l_0))/"
    r"(?:dense/(kernel)|batch_normalization/(gamma|beta|moving_mean|moving_variance))"
)
_CLASSIFIER = re.compile(r"head_supervised/linear_layer/dense/(kernel|bias)")


def _tf1_ignored(key: str) -> str | None:
    """Why a TF1 key is not part of the network, or None if it should be."""
    if key.endswith("/Momentum"):
        return "optimizer slot (momentum)"
    if key == "global_step":
        return "training step counter"
    if "memory" in key.split("/", 1)[0]:
        return "memory buffer of negatives (not part of the network)"
    return None


def _select_copy(keys: list[str], ema: bool) -> tuple[dict[str, str], list[tuple[str, str]]]:
    """{model name: key to read} and the copies not read (the EMA one, or the plain one with ema)."""
    ema_keys = {key[len(EMA_PREFIX) :]: key for key in keys if key.startswith(EMA_PREFIX)}
    plain = {key: key for key in keys if not key.startswith(EMA_PREFIX)}
    if not ema:
        return plain, [
            (key, "EMA copy of the network (--ema reads it)") for key in ema_keys.values()
        ]
    if not ema_keys:
        raise ConversionError(f"--ema: the checkpoint has no {EMA_PREFIX} copy of the network")
    skipped = [
        (key, f"plain copy of the network (--ema read the {EMA_PREFIX} copy)")
        for key in plain
        if key in ema_keys
    ]
    return {**plain, **ema_keys}, skipped


def _numbered(found: dict[int, dict[str, str]], family: str, roles: tuple[str, ...]) -> list[dict]:
    """Entries 0..max in counter order; a gap or a missing role is an error naming the variable."""
    missing = []
    for n in range(max(found, default=-1) + 1):
        name = f"base_model/{family}" + (f"_{n}" if n else "")
        entry = found.get(n, {})
        missing += [f"{name}/{role}" for role in roles if role not in entry]
    if missing:
        raise ConversionError(listing(f"the checkpoint lacks {len(missing)} variable(s):", missing))
    return [found[n] for n in range(len(found))]


def _parse_tf1(shapes: dict[str, Shape], *, ema: bool) -> Parsed:
    ignored, model_keys, trained = [], [], set()
    for key in sorted(shapes):
        why = _tf1_ignored(key)
        if why is None:
            model_keys.append(key)
            continue
        ignored.append((key, why))
        if key.endswith("/Momentum"):
            trained.add(key.removeprefix(EMA_PREFIX).split("/", 1)[0])
    names, skipped = _select_copy(model_keys, ema)
    ignored += skipped

    convs: dict[int, dict[str, str]] = {}
    norms: dict[int, dict[str, str]] = {}
    head: dict[int, dict[str, str]] = {}
    classifier: dict[str, str] = {}
    linear = False
    unplaced = []
    for name, key in sorted(names.items()):
        if match := _CONV.fullmatch(name):
            convs.setdefault(int(match[1] or 0), {})["kernel"] = key
        elif match := _BN.fullmatch(name):
            norms.setdefault(int(match[1] or 0), {})[match[2]] = key
        elif match := _HEAD.fullmatch(name):
            linear = linear or match[2] is not None
            layer = head.setdefault(int(match[1] or 0), {})
            layer[match[3] or BN_ROLES[match[4]]] = key
        elif match := _CLASSIFIER.fullmatch(name):
            classifier[match[1]] = key
        else:
            unplaced.append(name)
    if unplaced:
        raise ConversionError(
            listing(f"cannot place {len(unplaced)} variable(s) in a SimCLR network:", unplaced)
        )
    conv_list = [entry["kernel"] for entry in _numbered(convs, "conv2d", ("kernel",))]
    norm_list = [
        {BN_ROLES[role]: key for role, key in entry.items()}
        for entry in _numbered(norms, "batch_normalization", tuple(BN_ROLES))
    ]
    prefix = "head_contrastive/l_0" if linear else "head_contrastive/nl_{}"
    head_list = _check_head(head, lambda j: prefix.format(j))
    if linear and len(head) != 1:
        raise ConversionError("head_contrastive has both a linear (l_0) and nonlinear layers")
    return Parsed(
        kind="tf1",
        shapes=shapes,
        convs=conv_list,
        norms=norm_list,
        head=head_list,
        head_mode="none" if not head else "linear" if linear else "nonlinear",
        classifier=_check_classifier(classifier, "head_supervised/linear_layer/dense/{}"),
        ignored=ignored,
        trained_scopes=frozenset(trained),
        step_key="global_step" if "global_step" in shapes else None,
    )


def _check_head(head: dict[int, dict[str, str]], name) -> list[dict[str, str]]:
    """Layers 0..k-1, each with a kernel, gamma and statistics; beta on all but the last."""
    tf_name = {
        "kernel": "dense/kernel",
        **{v: f"batch_normalization/{k}" for k, v in BN_ROLES.items()},
    }
    missing, layers = [], max(head, default=-1) + 1
    for j in range(layers):
        last = j == layers - 1
        needed = [role for role in tf_name if not (last and role == "bias")]
        missing += [f"{name(j)}/{tf_name[r]}" for r in needed if r not in head.get(j, {})]
    if missing:
        raise ConversionError(listing(f"the checkpoint lacks {len(missing)} variable(s):", missing))
    return [head[j] for j in range(len(head))]


def _check_classifier(classifier: dict[str, str], name: str) -> dict[str, str] | None:
    if not classifier:
        return None
    missing = [name.format(role) for role in ("kernel", "bias") if role not in classifier]
    if missing:
        raise ConversionError(listing("the checkpoint lacks:", missing))
    return classifier


# ------------------------------------------------------------------------------------------- TF2

_SUFFIX = "/.ATTRIBUTES/VARIABLE_VALUE"
_TRAINABLE = re.compile(r"trainable_variables_list/(\d+)" + re.escape(_SUFFIX))
_BACKBONE_STAT = re.compile(r"model/resnet_model/variables/(\d+)" + re.escape(_SUFFIX))
_HEAD_STAT = re.compile(r"model/_projection_head/variables/(\d+)" + re.escape(_SUFFIX))


def _tf2_ignored(key: str) -> str | None:
    if key == "_CHECKPOINTABLE_OBJECT_GRAPH":
        return "object graph (names, no weights)"
    if key.startswith("save_counter/"):
        return "save counter"
    return None


def _indexed(found: dict[int, str], pattern: str) -> list[str]:
    missing = [pattern.format(i) for i in range(max(found, default=-1) + 1) if i not in found]
    if missing:
        raise ConversionError(listing(f"the checkpoint lacks {len(missing)} key(s):", missing))
    return [found[i] for i in range(len(found))]


def _parse_tf2(shapes: dict[str, Shape]) -> Parsed:
    ignored, trainable, backbone_stats, head_stats, unplaced = [], {}, {}, {}, []
    for key in sorted(shapes):
        if why := _tf2_ignored(key):
            ignored.append((key, why))
        elif match := _TRAINABLE.fullmatch(key):
            trainable[int(match[1])] = key
        elif match := _BACKBONE_STAT.fullmatch(key):
            backbone_stats[int(match[1])] = key
        elif match := _HEAD_STAT.fullmatch(key):
            head_stats[int(match[1])] = key
        else:
            unplaced.append(key)
    if unplaced:
        raise ConversionError(
            listing(f"cannot place {len(unplaced)} key(s) of a SimCLR SavedModel:", unplaced)
        )
    sequence = _indexed(trainable, "trainable_variables_list/{}" + _SUFFIX)
    rank = [len(shapes[key]) for key in sequence]

    classifier = None
    if len(sequence) >= 2 and rank[-2:] == [2, 1]:
        classifier = {"kernel": sequence[-2], "bias": sequence[-1]}
        sequence, rank = sequence[:-2], rank[:-2]
    if 4 not in rank:
        raise ConversionError("the SavedModel holds no convolution kernel: not a ResNet")
    # The last conv of the trunk is followed by its BN's gamma and beta; the head comes after.
    end = len(rank) - rank[::-1].index(4) + 2
    convs, norms = _tf2_backbone(sequence[:end], rank[:end])
    head = _tf2_head(sequence[end:], rank[end:])

    for layers, stats, where in (
        (norms, backbone_stats, "resnet_model"),
        (head, head_stats, "_projection_head"),
    ):
        keys = [stats[j] for j in sorted(stats)]
        if len(keys) != 2 * len(layers):
            raise ConversionError(
                f"model/{where}/variables holds {len(keys)} moving statistics for {len(layers)} "
                f"batch norms (2 each expected)"
            )
        for layer, mean, var in zip(layers, keys[0::2], keys[1::2], strict=True):
            layer.update(mean=mean, var=var)
    return Parsed(
        kind="tf2",
        shapes=shapes,
        convs=convs,
        norms=norms,
        head=head,
        head_mode="nonlinear" if head else "none",
        classifier=classifier,
        ignored=ignored,
        trained_scopes=frozenset(),
        step_key=None,
    )


def _tf2_backbone(keys: list[str], rank: list[int]) -> tuple[list[str], list[dict[str, str]]]:
    """Each conv kernel (rank 4) is followed by its BN's gamma and beta, or by nothing."""
    convs, norms = [], []
    i = 0
    while i < len(keys):
        if rank[i] != 4:
            raise ConversionError(
                f"{keys[i]}: a rank-{rank[i]} variable where a conv kernel belongs"
            )
        convs.append(keys[i])
        following = 0
        while i + 1 + following < len(keys) and rank[i + 1 + following] == 1:
            following += 1
        if following not in (0, 2):
            raise ConversionError(
                f"{keys[i]}: {following} vectors follow this conv kernel (a BN's gamma and beta "
                "expected)"
            )
        if following:
            norms.append({"scale": keys[i + 1], "bias": keys[i + 2]})
        i += 1 + following
    return convs, norms


def _tf2_head(keys: list[str], rank: list[int]) -> list[dict[str, str]]:
    """Per layer: its BN's gamma (and beta but for the last layer), then the dense kernel."""
    layers, pending = [], []
    for key, r in zip(keys, rank, strict=True):
        if r == 1:
            pending.append(key)
        elif r == 2 and len(pending) in (1, 2):
            layers.append({"kernel": key, **dict(zip(("scale", "bias"), pending, strict=False))})
            pending = []
        else:
            raise ConversionError(f"{key}: unexpected rank-{r} variable in the projection head")
    if pending:
        raise ConversionError(f"{pending[-1]}: a vector after the last projection-head layer")
    return layers
