"""The official SimCLR checkpoints (simclr_jax.convert) against the fixtures made with the official
code (tests/fixtures/official_checkpoints, see its README): every released layout maps onto our
models with nothing left over or missing; checkpoints built from two layouts and the fixtures'
weight generator reproduce the official TF1 forward pass; a TF2 SavedModel gives the same weights;
converted workdirs fine-tune, teach a distillation student and load with load_encoder."""

from __future__ import annotations

import functools
import math
import pathlib
import re
import subprocess
import sys

import jax
import numpy as np
import official_weights
import pytest

import simclr_jax
from simclr_jax import convert, distill, finetune, saved_run
from simclr_jax.configs import distill_fashion_mnist, finetune_fashion_mnist
from simclr_jax.official import ConversionError, make_plan, parse, reader

ROOT = pathlib.Path(__file__).resolve().parents[1]
FIXTURES = official_weights.FIXTURES
LAYOUTS = official_weights.layout_names()
RTOL = 1e-4  # a correct mapping measures ~1e-6; the fixture README's wrong mappings >= 5e-3
# Our output -> the official endpoint (fixture README, "Reference outputs").
ENDPOINTS = {
    "stem": "initial_max_pool",
    **{f"block_group{k}": f"block_group{k}" for k in range(1, 5)},
    "features": "final_avg_pool",
    "head_1": "proj_head_layer1",
    "head_2": "proj_head_layer2",
    "head_3": "proj_head_output",
    "projection": "proj_head_output",
}
BN_ROLES = ("gamma", "beta", "moving_mean", "moving_variance")
KERAS_LAYER = re.compile(r"(?:sync_)?(conv2d|batch_normalization)(_\d+)?")


@pytest.fixture(scope="session")
def gen():
    """The fixtures' weights and images (tests/official_weights.py), numpy's streams checked."""
    official_weights.check_stream()
    return official_weights


load_layout = official_weights.load_layout


def save_checkpoint(prefix: pathlib.Path, tensors: dict[str, np.ndarray]) -> str:
    """A TF checkpoint (tensor bundle, what tf1's Saver writes) holding `tensors`."""
    import tensorflow as tf

    prefix.parent.mkdir(parents=True, exist_ok=True)
    names = sorted(tensors)
    tf.raw_ops.SaveV2(
        prefix=str(prefix),
        tensor_names=names,
        shape_and_slices=[""] * len(names),
        tensors=[tf.constant(tensors[name]) for name in names],
    )
    return str(prefix)


def restored(workdir) -> dict:
    """{'params', 'batch_stats'} of a workdir, as our stages read them."""
    run = saved_run.read_run(str(workdir))
    return jax.tree.map(np.asarray, saved_run.restore_variables(run, saved_run.build_from_run(run)))


# --------------------------------------------------------------------------- layouts (no arrays)


def colab_count(layout: dict) -> float:
    """The official colab's parameter count of the base network (in the TF1 layouts' header)."""
    if "counts" not in layout:  # TF2 layouts: the TF1 layout of the same architecture
        layout = load_layout(f"tf1_{layout['arch']}_pretrain.json")
    return layout["counts"]["params_M_colab_count"]


def by_architecture() -> dict[str, list[str]]:
    """Layout names grouped by architecture (v1 apart), so a test traces each model once."""
    groups: dict[str, list[str]] = {}
    for name in LAYOUTS:
        arch = load_layout(name)["arch"] + ("_v1" if "_v1_" in name else "")
        groups.setdefault(arch, []).append(name)
    return groups


@pytest.mark.parametrize("names", list(by_architecture().values()), ids=list(by_architecture()))
def test_every_layout_maps_onto_our_model(names):
    """Every variable is read once or ignored for a stated reason, every model variable is filled,
    and the architecture is the layout's, down to the official parameter count. Shapes only:
    jax.eval_shape of our model, no array allocated (r152_3x_sk1 has 795M parameters)."""
    for name in names:
        check_layout(name)


def check_layout(name: str) -> None:
    layout = load_layout(name)
    shapes = {v["name"]: v["shape"] for v in layout["variables"]}
    kind = "tf2" if name.startswith("tf2_") else "tf1"
    live_before = sum(a.nbytes for a in jax.live_arrays())
    plan = make_plan(parse(shapes, kind))
    assert sum(a.nbytes for a in jax.live_arrays()) - live_before < 2**20

    read = list(plan.sources.values())
    ignored = [key for key, _ in plan.parsed.ignored]
    assert len(set(read)) == len(read)
    assert sorted(read + ignored) == sorted(shapes), name  # nothing left over
    if kind == "tf1":
        assert set(ignored) == {n for n in shapes if n.endswith("/Momentum") or n == "global_step"}
    else:
        assert ignored == ["_CHECKPOINTABLE_OBJECT_GRAPH"]
    assert set(plan.sources) | set(plan.added) == set(plan.shapes), name  # nothing missing
    has_classifier = any(n.startswith("head_supervised/") for n in shapes) or kind == "tf2"
    assert bool(plan.added) is not has_classifier  # a missing classifier is added (zeros)

    assert plan.name == layout["arch"]
    assert plan.model["sk_ratio"] == (0.0625 if layout["arch"].endswith("sk1") else 0.0)
    backbone = sum(math.prod(s) for p, s in plan.shapes.items() if p.split("/")[1] == "backbone")
    assert round(backbone / 1e6, 3) == colab_count(layout), name
    head = (plan.model["proj_head_mode"], plan.model["num_proj_layers"], plan.model["proj_out_dim"])
    if "_v1_lineareval" in name:
        assert head[0] == "none"
    else:
        assert head == ("nonlinear", 2 if "_v1_" in name else 3, 128)
    assert plan.num_classes == 1000
    finetuned = name.endswith(("_finetune", "_lineareval"))
    assert convert.choose_stage(plan.parsed)[0] == ("finetune" if finetuned else "pretrain")


# ------------------------------------------------------------------- the official forward pass


@pytest.fixture(scope="module")
def official(gen, tmp_path_factory):
    """Converted workdirs of checkpoints built from the layouts with the fixtures' generator:
    r50_1x_sk1 'pretrained' and r50_1x_sk0 'finetuned' (its classifier reading head_1), without
    the Momentum slots (half the size; the tiny checkpoints below have them)."""
    root = tmp_path_factory.mktemp("official")
    workdirs = {}
    for arch, mode in (("r50_1x_sk1", "pretrain"), ("r50_1x_sk0", "finetune")):
        layout = load_layout(f"tf1_{arch}_{mode}.json")
        prefix = root / f"{arch}_{mode}" / "model.ckpt-250228"
        gen.write_tf_checkpoint(
            layout["variables"], str(prefix), skip=lambda name: name.endswith("/Momentum")
        )
        workdirs[arch] = root / f"{arch}_jax"
        report = convert.convert(str(prefix.parent), str(workdirs[arch]), stage=mode)
        assert (report["stage"], report["architecture"]) == (mode, arch)
    return workdirs


@functools.cache
def forward(workdir: str, images: bytes):
    run = saved_run.read_run(workdir)
    model = saved_run.build_from_run(run)
    variables = saved_run.restore_variables(run, model)
    x = np.frombuffer(images, np.float32).reshape(2, 64, 64, 3)
    out = jax.jit(functools.partial(model.apply, train=False))(variables, x)
    return run, variables, jax.tree.map(np.asarray, out)


@pytest.mark.parametrize("arch", ["r50_1x_sk1", "r50_1x_sk0"])
def test_converted_models_reproduce_the_official_outputs(arch, official, gen):
    """Every endpoint within 1e-4 of max|ref| (CPU, float32): the stem, each block group, the
    pooled features, each projection-head layer and the logits of the fine-tuned classifier
    (reading head_1) or of the pretrained model's linear-eval head (reading the features)."""
    run, variables, out = forward(str(official[arch]), gen.images(2, 64).tobytes())
    reference = np.load(FIXTURES / f"reference_{arch}.npz")
    expected = dict(ENDPOINTS)
    if run.stage == "finetune":
        expected["logits"] = "logits_sup_ft_proj_selector_1"
    else:
        expected["logits"] = "logits_sup"
    for ours, theirs in expected.items():
        ref = reference[theirs]
        assert out[ours].shape == ref.shape, ours
        error = np.max(np.abs(out[ours] - ref)) / np.max(np.abs(ref))
        assert error <= RTOL, (ours, error)
    # The same classifier on the pooled features is the official ft_proj_selector=0 output.
    classifier = variables["params"]["classifier"]
    linear = out["features"] @ classifier["kernel"] + classifier["bias"]
    ref = reference["logits_sup"]
    assert np.max(np.abs(linear - ref)) / np.max(np.abs(ref)) <= RTOL


def tf1_name(tf_variable: str) -> str:
    """The TF1 checkpoint name of a TF2 Keras variable (the layouts' `tf_variable` column): the
    layer counters of a fresh process number conv2d / batch norms in creation order, as tf1."""
    path = tf_variable.removesuffix(":0").split("/")
    layer, leaf = path[-2], path[-1]
    if path[0] == "resnet":
        family, counter = KERAS_LAYER.fullmatch(layer).groups()
        return f"base_model/{family}{counter or ''}/{leaf}"
    if path[0] == "projection_head":
        inner = "dense/kernel" if leaf == "kernel" else f"batch_normalization/{leaf}"
        return f"head_contrastive/{path[1]}/{inner}"
    assert path[0] == "head_supervised", tf_variable
    return f"head_supervised/linear_layer/dense/{leaf}"


@pytest.mark.parametrize("arch", ["r50_1x_sk0", "r50_1x_sk1", "r152_3x_sk1"])
def test_a_tf2_savedmodel_maps_like_the_tf1_checkpoint(arch):
    """A SavedModel's keys (by index, no layer names) land where the TF1 variables of the same
    Keras variables (the layouts' `tf_variable` column) land: with the TF1 numerics above, the
    converted SavedModel computes the official outputs too."""
    tf2 = load_layout(f"tf2_savedmodel_{arch}.json")
    tf1 = load_layout(f"tf1_{arch}_pretrain.json")
    tf1_plan = make_plan(parse({v["name"]: v["shape"] for v in tf1["variables"]}, "tf1"))
    tf2_plan = make_plan(parse({v["name"]: v["shape"] for v in tf2["variables"]}, "tf2"))
    same = {r["name"]: tf1_name(r["tf_variable"]) for r in tf2["variables"] if "tf_variable" in r}
    assert tf2_plan.model == tf1_plan.model and tf2_plan.shapes == tf1_plan.shapes
    assert {path: same[key] for path, key in tf2_plan.sources.items()} == tf1_plan.sources


def test_a_savedmodel_folder_is_found(tmp_path):
    """The SavedModel folder, its variables/ folder or the prefix itself, found before any read."""
    (tmp_path / "saved" / "variables").mkdir(parents=True)
    (tmp_path / "saved" / "variables" / "variables.index").touch()
    prefix = str(tmp_path / "saved" / "variables" / "variables")
    for path in ("saved", "saved/variables", "saved/variables/variables"):
        assert reader.locate(str(tmp_path / path)) == (prefix, "tf2")
    (tmp_path / "tf1").mkdir()
    for step in (5, 40):
        (tmp_path / "tf1" / f"model.ckpt-{step}.index").touch()
    found = str(tmp_path / "tf1" / "model.ckpt-40")
    assert reader.locate(str(tmp_path / "tf1")) == (found, None)
    assert reader.locate(found + ".data-00000-of-00001") == (found, None)


# ------------------------------------------------------------- a tiny official-style network


def official_resnet18(base: int, classes: int, proj_out: int) -> dict[str, tuple[int, ...]]:
    """TF1 names and shapes of an official ResNet-18 (resnet.py: 7x7 stem conv + BN; each
    residual_block makes [its group's shortcut 1x1 conv + BN], a 3x3 conv + BN, a 3x3 conv + BN),
    at `base` channels instead of 64, with a 2-layer head and a classifier (model_util.py)."""
    convs, norms, channels = [(7, 7, 3, base)], [base], base
    for group in range(4):
        filters = base * 2**group
        for block in range(2):
            if block == 0:
                convs.append((1, 1, channels, filters))
                norms.append(filters)
            convs += [(3, 3, channels, filters), (3, 3, filters, filters)]
            norms += [filters, filters]
            channels = filters
    names = {}
    for n, shape in enumerate(convs):
        names[f"base_model/conv2d{f'_{n}' if n else ''}/kernel"] = shape
    for n, width in enumerate(norms):
        for role in BN_ROLES:
            names[f"base_model/batch_normalization{f'_{n}' if n else ''}/{role}"] = (width,)
    for j, out in enumerate((channels, proj_out)):
        names[f"head_contrastive/nl_{j}/dense/kernel"] = (channels, out)
        for role in BN_ROLES if j == 0 else ("gamma", "moving_mean", "moving_variance"):
            names[f"head_contrastive/nl_{j}/batch_normalization/{role}"] = (out,)
    names["head_supervised/linear_layer/dense/kernel"] = (channels, classes)
    names["head_supervised/linear_layer/dense/bias"] = (classes,)
    return names


def tiny_checkpoint(gen, prefix, *, trained=("base_model", "head_contrastive", "head_supervised"),
                    ema=False, drop=(), reshape=None) -> str:  # fmt: skip
    """A TF1 file of the tiny network as the official Saver writes it: the model, a Momentum slot
    for each trained weight, global_step, optionally an `ema_model/` copy (other values)."""
    model = official_resnet18(base=4, classes=10, proj_out=8)
    tensors = {name: gen.value(name, shape) for name, shape in model.items() if name not in drop}
    for name, shape in model.items():
        if name.split("/")[0] in trained and not name.endswith(("moving_mean", "moving_variance")):
            tensors[f"{name}/Momentum"] = np.zeros(shape, np.float32)
        if ema and not name.startswith("head_supervised"):
            tensors[f"ema_model/{name}"] = gen.value(f"ema_model/{name}", shape)
    if reshape is not None:
        name, shape = reshape
        tensors[name] = gen.value(name, shape)
    tensors["global_step"] = np.asarray(751, np.int64)
    return save_checkpoint(pathlib.Path(prefix), tensors)


@pytest.fixture(scope="module")
def tiny(gen, tmp_path_factory):
    """Converted tiny workdirs: 'pretrain' (slots everywhere, with an EMA copy) and 'finetune'
    (slots on the base network and the classifier only, as the official fine-tuning)."""
    root = tmp_path_factory.mktemp("tiny")
    pretrained = tiny_checkpoint(gen, root / "pretrained" / "model.ckpt-751", ema=True)
    finetuned = tiny_checkpoint(
        gen, root / "finetuned" / "model.ckpt-751", trained=("base_model", "head_supervised")
    )
    reports = {
        "pretrain": convert.convert(pretrained, str(root / "pretrain")),
        "ema": convert.convert(pretrained, str(root / "ema"), ema=True),
        "finetune": convert.convert(finetuned, str(root / "finetune")),
    }
    return root, reports


def test_the_ema_copy_is_ignored_or_read_on_request(tiny, gen):
    root, reports = tiny
    plain, ema = restored(root / "pretrain"), restored(root / "ema")
    stem, head = "base_model/conv2d/kernel", "head_contrastive/nl_1/batch_normalization/moving_mean"
    shapes = official_resnet18(4, 10, 8)
    np.testing.assert_array_equal(
        plain["params"]["backbone"]["stem"]["conv1"]["kernel"], gen.value(stem, shapes[stem])
    )
    np.testing.assert_array_equal(
        ema["params"]["backbone"]["stem"]["conv1"]["kernel"],
        gen.value(f"ema_model/{stem}", shapes[stem]),
    )
    np.testing.assert_array_equal(
        ema["batch_stats"]["head"]["bn2"]["mean"], gen.value(f"ema_model/{head}", shapes[head])
    )
    # The classifier has no EMA copy: both read the plain one.
    for name in ("kernel", "bias"):
        np.testing.assert_array_equal(
            ema["params"]["classifier"][name], plain["params"]["classifier"][name]
        )
    copies = len([n for n in shapes if not n.startswith("head_supervised")])
    ignored = reports["pretrain"]["ignored"]
    assert ignored["EMA copy of the network (--ema reads it)"] == copies
    assert reports["ema"]["ignored"][
        "plain copy of the network (--ema read the ema_model/ copy)"
    ] == (copies)
    assert reports["pretrain"]["step"] == 751 and reports["pretrain"]["architecture"] == (
        "r18_1x_sk0_base4"
    )


@pytest.fixture(scope="module")
def rgb_folder(tmp_path_factory):
    """A labelled image folder: train/, 10 classes of 3 random 40 px RGB images."""
    from PIL import Image

    root = tmp_path_factory.mktemp("rgb_folder")
    rng = np.random.default_rng(0)
    for label in range(10):
        (root / "train" / f"class{label}").mkdir(parents=True)
        for i in range(3):
            pixels = rng.integers(0, 256, (40, 40, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(root / "train" / f"class{label}" / f"{i}.png")
    return root


def test_a_converted_pretrained_model_fine_tunes_and_loads(tiny, tmp_path):
    """Linear evaluation from the converted pretrained model (Fashion-MNIST, resized to 32 px for
    the ImageNet stem): the network is restored and kept bit for bit, the new classifier trains;
    load_encoder reads both converted workdirs."""
    root, reports = tiny
    config = finetune_fashion_mnist.get_config("tiny_linear_eval")
    config.init_checkpoint = str(root / "pretrain")
    config.dataset.update(image_size=32, eval_split="")
    config.num_steps = 2
    config.evals.knn.k = 0
    results = finetune.train_and_evaluate(config, str(tmp_path / "ft"))
    assert results["step"] == 2 and np.isfinite(results["loss"])
    before, after = restored(root / "pretrain"), restored(tmp_path / "ft")
    for collection in ("params", "batch_stats"):
        for part in ("backbone", "head"):
            same = jax.tree.map(np.array_equal, before[collection][part], after[collection][part])
            assert all(jax.tree.leaves(same)), (collection, part)
    assert np.any(after["params"]["classifier"]["kernel"] != 0)  # zero-initialised, then trained

    images = np.random.default_rng(0).integers(0, 256, (3, 40, 40, 3), dtype=np.uint8)
    for stage in ("pretrain", "finetune"):
        apply_fn, variables = simclr_jax.load_encoder(str(root / stage))
        out = apply_fn(variables, images)
        assert out["features"].shape == (3, 32) and out["logits"].shape == (3, 10)


def test_a_converted_fine_tuned_model_teaches_a_student(tiny, rgb_folder, tmp_path):
    """Distillation with the converted fine-tuned model as the teacher (RGB images, as the
    teacher's; its classifier reads head_1, as the official fine-tuning)."""
    root, reports = tiny
    assert (reports["finetune"]["stage"], reports["finetune"]["ft_proj_selector"]) == (
        "finetune",
        1,
    )
    config = distill_fashion_mnist.get_config("tiny")
    config.teacher_checkpoint = str(root / "finetune")
    config.dataset.update(
        name="folder", source="folder", data_dir=str(rgb_folder), train_split="train",
        eval_split="", image_size=32,
    )  # fmt: skip
    config.num_steps = 2
    config.evals.knn.k = 0
    results = distill.train_and_evaluate(config, str(tmp_path / "student"))
    assert results["step"] == 2 and 0.0 <= results["teacher_agreement"] <= 1.0


# ---------------------------------------------------------------------------------- bad input


def test_a_missing_or_misshaped_variable_is_named(gen, tmp_path):
    missing = "base_model/batch_normalization_7/moving_variance"
    prefix = tiny_checkpoint(gen, tmp_path / "a" / "model.ckpt-1", drop=(missing,))
    with pytest.raises(ConversionError, match=missing):
        convert.convert(prefix, str(tmp_path / "a_jax"))
    wrong = "base_model/conv2d_5/kernel"
    prefix = tiny_checkpoint(gen, tmp_path / "b" / "model.ckpt-1", reshape=(wrong, (3, 3, 8, 9)))
    with pytest.raises(ConversionError, match=f"{wrong}: shape \\(3, 3, 8, 9\\)"):
        convert.convert(prefix, str(tmp_path / "b_jax"))
    stray = "head_contrastive/nl_0/extra/kernel"
    prefix = tiny_checkpoint(gen, tmp_path / "c" / "model.ckpt-1", reshape=(stray, (4,)))
    with pytest.raises(ConversionError, match=stray):
        convert.convert(prefix, str(tmp_path / "c_jax"))
    assert not (tmp_path / "a_jax").exists()


def test_a_path_that_is_no_checkpoint_fails_in_one_line(tmp_path):
    text = tmp_path / "notes.txt"
    text.write_text("not a checkpoint")
    command = [sys.executable, "-m", "simclr_jax.convert", f"--checkpoint={text}",
               f"--workdir={tmp_path / 'out'}"]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == [
        f"simclr_jax.convert: error: {text} is not a TensorFlow checkpoint: neither a "
        "model.ckpt-N prefix (with its .index file) nor a folder holding one or a SavedModel"
    ]
    with pytest.raises(ConversionError, match="holds no TensorFlow checkpoint"):
        convert.convert(str(tmp_path), str(tmp_path / "out"))
