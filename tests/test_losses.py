"""Losses against independent NumPy references; NT-Xent also under shard_map and pmap on 8 CPUs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from simclr_jax import losses

REPO_ROOT = Path(__file__).resolve().parents[1]

# Jitted entry points: one compile per configuration is much cheaper than op-by-op eager dispatch.
nt_xent = jax.jit(losses.nt_xent, static_argnames=("temperature", "normalize", "axis_name"))
softmax_cross_entropy = jax.jit(losses.softmax_cross_entropy)


# ----------------------------------------------------------------------------- NumPy references


def _logsumexp(x: np.ndarray) -> float:
    top = np.max(x)
    return float(top + np.log(np.sum(np.exp(x - top))))


def reference_nt_xent(za, zb, temperature, normalize=True, memory=None):
    """NT-Xent from the paper's definition in float64: 2N views, each scored against 2N-1 others.

    Returns (loss, contrast_acc, contrast_entropy). Written view by view (not in the a/b block form
    the implementation uses) so that the two are independent.
    """
    za, zb = np.asarray(za, np.float64), np.asarray(zb, np.float64)
    if normalize:
        za = za / np.linalg.norm(za, axis=1, keepdims=True)
        zb = zb / np.linalg.norm(zb, axis=1, keepdims=True)
    n = za.shape[0]
    views = np.concatenate([za, zb])
    negatives_extra = np.zeros((0, za.shape[1]))
    if memory is not None:
        negatives_extra = np.asarray(memory, np.float64)
        if normalize:
            negatives_extra = negatives_extra / np.linalg.norm(
                negatives_extra, axis=1, keepdims=True
            )
    total = 0.0
    for i in range(2 * n):
        positive = (i + n) % (2 * n)
        others = [j for j in range(2 * n) if j != i]
        candidates = np.concatenate([views[others], negatives_extra])
        scores = candidates @ views[i] / temperature
        total += _logsumexp(scores) - views[i] @ views[positive] / temperature
    loss = total / n  # sum of both directions, averaged over the n images
    ab = za @ zb.T / temperature
    acc = np.mean(np.argmax(ab, axis=1) == np.arange(n))
    probs = np.exp(ab - ab.max(axis=1, keepdims=True))
    probs /= probs.sum(axis=1, keepdims=True)
    entropy = np.mean(-np.sum(probs * np.log(probs), axis=1))
    return loss, acc, entropy


def finite_difference_grad(fn, x: np.ndarray, eps: float = 1e-6) -> np.ndarray:
    grad = np.zeros_like(x, dtype=np.float64)
    for index in np.ndindex(x.shape):
        up, down = x.astype(np.float64), x.astype(np.float64)
        up[index] += eps
        down[index] -= eps
        grad[index] = (fn(up) - fn(down)) / (2 * eps)
    return grad


def _projections(seed: int, batch: int, dim: int = 5, scale: float = 1.0):
    rng = np.random.default_rng(seed)
    za = rng.normal(size=(batch, dim)) * scale
    zb = za + 0.7 * rng.normal(size=(batch, dim)) * scale  # correlated views
    return za.astype(np.float32), zb.astype(np.float32)


# ----------------------------------------------------------------------------- NT-Xent, one device


@pytest.mark.parametrize(
    "batch,temperature,normalize",
    [(1, 0.5, True), (4, 0.1, True), (7, 1.0, True), (4, 0.5, False), (6, 0.2, False)],
)
def test_nt_xent_matches_numpy_value_metrics_and_gradient(batch, temperature, normalize):
    za, zb = _projections(batch, batch, scale=1.0 if normalize else 0.4)

    def loss_fn(a, b):
        return losses.nt_xent(a, b, temperature=temperature, normalize=normalize)

    value_and_grad = jax.jit(jax.value_and_grad(loss_fn, argnums=(0, 1), has_aux=True))
    (loss, metrics), (grad_a, grad_b) = value_and_grad(za, zb)
    ref_loss, ref_acc, ref_entropy = reference_nt_xent(za, zb, temperature, normalize)
    np.testing.assert_allclose(loss, ref_loss, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(metrics["contrast_acc"], ref_acc, atol=1e-6)
    np.testing.assert_allclose(metrics["contrast_entropy"], ref_entropy, rtol=1e-5, atol=1e-5)
    assert loss.dtype == jnp.float32

    ref_grad_a = finite_difference_grad(
        lambda a: reference_nt_xent(a, zb, temperature, normalize)[0], za
    )
    ref_grad_b = finite_difference_grad(
        lambda b: reference_nt_xent(za, b, temperature, normalize)[0], zb
    )
    np.testing.assert_allclose(grad_a, ref_grad_a, rtol=1e-3, atol=2e-5)
    np.testing.assert_allclose(grad_b, ref_grad_b, rtol=1e-3, atol=2e-5)


def test_nt_xent_perfect_views_are_confident():
    """Identical, well-separated views: the positive wins, accuracy 1, loss and entropy near 0."""
    z = np.eye(4, dtype=np.float32)
    loss, metrics = nt_xent(z, z, temperature=0.01)
    assert float(metrics["contrast_acc"]) == 1.0
    assert float(loss) < 1e-6 and float(metrics["contrast_entropy"]) < 1e-6


def test_nt_xent_bfloat16_inputs_compute_in_float32():
    za, zb = _projections(3, 4)
    za16, zb16 = jnp.asarray(za, jnp.bfloat16), jnp.asarray(zb, jnp.bfloat16)
    loss, metrics = nt_xent(za16, zb16, temperature=0.2)
    assert loss.dtype == jnp.float32 and metrics["contrast_entropy"].dtype == jnp.float32
    ref_loss, _, _ = reference_nt_xent(
        np.asarray(za16, np.float32), np.asarray(zb16, np.float32), 0.2
    )
    np.testing.assert_allclose(loss, ref_loss, rtol=1e-5)


@pytest.mark.parametrize("normalize", [True, False])
def test_nt_xent_memory_negatives(normalize):
    za, zb = _projections(11, 3, scale=1.0 if normalize else 0.4)
    memory = np.random.default_rng(12).normal(size=(5, za.shape[1])).astype(np.float32) * 0.4

    def loss_fn(a, b, mem):
        return losses.nt_xent(a, b, temperature=0.3, normalize=normalize, memory=mem)

    value_and_grad = jax.jit(jax.value_and_grad(loss_fn, argnums=(0, 1, 2), has_aux=True))
    (loss, _), grads = value_and_grad(za, zb, memory)
    ref_loss, _, _ = reference_nt_xent(za, zb, 0.3, normalize, memory=memory)
    np.testing.assert_allclose(loss, ref_loss, rtol=1e-5, atol=1e-5)
    # Memory adds negatives: the loss must differ from the loss without it.
    assert abs(ref_loss - reference_nt_xent(za, zb, 0.3, normalize)[0]) > 1e-3
    ref_grad_a = finite_difference_grad(
        lambda a: reference_nt_xent(a, zb, 0.3, normalize, memory=memory)[0], za
    )
    np.testing.assert_allclose(grads[0], ref_grad_a, rtol=1e-3, atol=2e-5)
    np.testing.assert_array_equal(grads[2], np.zeros_like(memory))  # the queue is not trained


def test_nt_xent_normalizes_memory_when_normalize():
    za, zb = _projections(13, 3)
    memory = np.random.default_rng(14).normal(size=(4, za.shape[1])).astype(np.float32)
    loss_unit, _ = nt_xent(za, zb, temperature=0.2, memory=memory)
    loss_scaled, _ = nt_xent(za, zb, temperature=0.2, memory=7.0 * memory)
    np.testing.assert_allclose(loss_unit, loss_scaled, rtol=1e-6)


def test_nt_xent_memory_mask_drops_rows():
    """Masked memory rows (a queue's unfilled slots) are not negatives at all."""
    za, zb = _projections(15, 3)
    memory = np.random.default_rng(16).normal(size=(6, za.shape[1])).astype(np.float32)
    mask = np.array([True, False, True, True, False, False])
    loss, _ = nt_xent(za, zb, temperature=0.2, memory=memory, memory_mask=mask)
    ref_loss, _, _ = reference_nt_xent(za, zb, 0.2, memory=memory[mask])
    np.testing.assert_allclose(loss, ref_loss, rtol=1e-5)
    assert abs(ref_loss - reference_nt_xent(za, zb, 0.2, memory=memory)[0]) > 1e-3
    none_valid, _ = nt_xent(za, zb, temperature=0.2, memory=memory, memory_mask=mask & False)
    np.testing.assert_allclose(none_valid, reference_nt_xent(za, zb, 0.2)[0], rtol=1e-5)
    with pytest.raises(ValueError, match="memory_mask"):
        losses.nt_xent(za, zb, temperature=0.2, memory=memory, memory_mask=mask[:4])


def test_nt_xent_rejects_bad_arguments():
    z = np.ones((4, 3), np.float32)
    with pytest.raises(ValueError, match="z_a and z_b"):
        losses.nt_xent(z, np.ones((4, 2), np.float32), temperature=0.1)
    with pytest.raises(ValueError, match="temperature"):
        losses.nt_xent(z, z, temperature=0.0)
    with pytest.raises(ValueError, match="memory"):
        losses.nt_xent(z, z, temperature=0.1, memory=np.ones((2, 5), np.float32))


# ----------------------------------------------------------------------------- NT-Xent, 8 devices

MULTI_DEVICE_SCRIPT = textwrap.dedent(
    """
    import json
    import jax, jax.numpy as jnp, numpy as np
    from jax import lax
    from jax.sharding import Mesh, PartitionSpec as P
    from simclr_jax import losses

    def shard_map(f, mesh, in_specs, out_specs, check_vma):
        if hasattr(jax, "shard_map"):
            return jax.shard_map(f, mesh=mesh, in_specs=in_specs, out_specs=out_specs,
                                 check_vma=check_vma)
        from jax.experimental.shard_map import shard_map as legacy  # jax < 0.7
        return legacy(f, mesh, in_specs, out_specs, check_rep=check_vma)

    R, b, d_in, d = jax.device_count(), 2, 6, 4
    rng = np.random.default_rng(0)
    xa = jnp.asarray(rng.normal(size=(R * b, d_in)), jnp.float32)
    xb = jnp.asarray(xa + 0.5 * rng.normal(size=(R * b, d_in)), jnp.float32)
    w = jnp.asarray(rng.normal(size=(d_in, d)), jnp.float32)   # a replicated "parameter"
    memory = jnp.asarray(rng.normal(size=(3, d)), jnp.float32)

    def loss_fn(w, xa, xb, axis_name, mem):
        # Gradients w.r.t. w (replicated) and w.r.t. this replica's z = x @ w (via xa, xb).
        return losses.nt_xent(xa @ w, xb @ w, temperature=0.2, axis_name=axis_name, memory=mem)

    def grads(w, xa, xb, axis_name, mem):
        (loss, metrics), g = jax.value_and_grad(loss_fn, argnums=(0, 1, 2), has_aux=True)(
            w, xa, xb, axis_name, mem)
        return loss, metrics, g

    results = {}
    for use_memory in (False, True):
        mem = memory if use_memory else None
        single = jax.jit(lambda w, xa, xb: grads(w, xa, xb, None, mem))(w, xa, xb)
        mesh = Mesh(np.array(jax.devices()), ("data",))
        for check_vma in (True, False):
            def mapped(w, xa, xb, check_vma=check_vma):
                loss, metrics, (gw, ga, gb) = grads(w, xa, xb, "data", mem)
                if not check_vma:  # pmap semantics: per-replica parameter gradients, then pmean
                    gw = lax.pmean(gw, "data")
                return loss, metrics, (gw, ga, gb)

            step = shard_map(mapped, mesh, in_specs=(P(), P("data"), P("data")),
                             out_specs=(P(), P(), (P(), P("data"), P("data"))),
                             check_vma=check_vma)
            out = jax.jit(step)(w, xa, xb)
            results[f"shard_map_vma{check_vma}_mem{use_memory}"] = (out, single)

        def pmapped(w, xa, xb):
            loss, metrics, (gw, ga, gb) = grads(w, xa, xb, "data", mem)
            return loss, metrics, (lax.pmean(gw, "data"), ga, gb)

        out = jax.pmap(pmapped, axis_name="data", in_axes=(None, 0, 0))(
            w, xa.reshape(R, b, d_in), xb.reshape(R, b, d_in))
        out = jax.tree.map(lambda x: x[0], out[:2]) + (
            (out[2][0][0], out[2][1].reshape(R * b, d_in), out[2][2].reshape(R * b, d_in)),)
        results[f"pmap_mem{use_memory}"] = (out, single)

    def off_ratio(mapped, single):  # largest deviation from mapped = ratio * single
        ratio = (mapped * single).sum() / (single * single).sum()
        return float(jnp.max(jnp.abs(mapped - ratio * single)))

    report = {"devices": R}
    for name, ((loss, metrics, (gw, ga, gb)), (s_loss, s_metrics, (s_gw, s_ga, s_gb))) in (
            results.items()):
        report[name] = {
            "loss": [float(loss), float(s_loss)],
            "acc": [float(metrics["contrast_acc"]), float(s_metrics["contrast_acc"])],
            "entropy": [float(metrics["contrast_entropy"]), float(s_metrics["contrast_entropy"])],
            "grad_w_err": float(jnp.max(jnp.abs(gw - s_gw))),
            "grad_w_scale": float(jnp.max(jnp.abs(s_gw))),
            # ratio of the mapped input gradient to the single-device one (R under pmap semantics)
            "grad_x_ratio": float(jnp.sum(ga * s_ga) / jnp.sum(s_ga * s_ga)),
            "grad_x_err_a": off_ratio(ga, s_ga),
            "grad_x_err_b": off_ratio(gb, s_gb),
            "grad_x_scale": float(jnp.max(jnp.abs(s_ga))),
        }
    print("RESULT" + json.dumps(report))
    """
)


@pytest.fixture(scope="module")
def multi_device_report() -> dict:
    env = dict(os.environ)
    env["XLA_FLAGS"] = env.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
    env["JAX_PLATFORMS"] = "cpu"
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
    completed = subprocess.run(
        [sys.executable, "-c", MULTI_DEVICE_SCRIPT],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert completed.returncode == 0, completed.stderr[-4000:]
    line = next(x for x in completed.stdout.splitlines() if x.startswith("RESULT"))
    return json.loads(line[len("RESULT") :])


@pytest.mark.parametrize("memory", [False, True])
@pytest.mark.parametrize("mapping", ["shard_map_vmaTrue", "shard_map_vmaFalse", "pmap"])
def test_nt_xent_mapped_equals_single_device(multi_device_report, mapping, memory):
    report = multi_device_report[f"{mapping}_mem{memory}"]
    replicas = multi_device_report["devices"]
    assert replicas == 8
    for key in ("loss", "acc", "entropy"):
        mapped, single = report[key]
        np.testing.assert_allclose(mapped, single, rtol=1e-5, atol=1e-6, err_msg=key)
    # Input gradients: exact under shard_map(check_vma=True); R times larger under pmap semantics
    # (the per-replica gradient of the replica's loss share, summed through all_gather's transpose).
    expected_ratio = 1.0 if mapping == "shard_map_vmaTrue" else float(replicas)
    np.testing.assert_allclose(report["grad_x_ratio"], expected_ratio, rtol=1e-5)
    assert report["grad_x_err_a"] <= 1e-5 * max(1.0, report["grad_x_scale"] * replicas)
    assert report["grad_x_err_b"] <= 1e-5 * max(1.0, report["grad_x_scale"] * replicas)
    # Replicated parameter: exact with check_vma=True as is; after the usual pmean otherwise.
    assert report["grad_w_err"] <= 1e-5 * max(1.0, report["grad_w_scale"])


# ----------------------------------------------------------------------------- supervised, distill


def test_softmax_cross_entropy_matches_numpy_with_and_without_mask():
    rng = np.random.default_rng(3)
    logits = rng.normal(size=(6, 4)).astype(np.float32) * 3
    labels = rng.integers(0, 4, size=6)
    per_example = np.array(
        [
            _logsumexp(row.astype(np.float64)) - row[label]
            for row, label in zip(logits, labels, strict=True)
        ]
    )
    np.testing.assert_allclose(softmax_cross_entropy(logits, labels), per_example.mean(), rtol=1e-5)
    mask = np.array([1, 0, 1, 1, 0, 0], bool)
    np.testing.assert_allclose(
        softmax_cross_entropy(logits, labels, mask=mask), per_example[mask].mean(), rtol=1e-5
    )
    assert float(softmax_cross_entropy(logits, labels, mask=np.zeros(6, bool))) == 0.0
    bf16 = softmax_cross_entropy(jnp.asarray(logits, jnp.bfloat16), labels)
    assert bf16.dtype == jnp.float32


@pytest.mark.parametrize("temperature", [1.0, 2.5])
def test_distillation_loss_matches_numpy(temperature):
    rng = np.random.default_rng(4)
    student = rng.normal(size=(5, 3)).astype(np.float32)
    teacher = rng.normal(size=(5, 3)).astype(np.float32) * 2

    def softmax(x):
        e = np.exp(x - x.max(axis=1, keepdims=True))
        return e / e.sum(axis=1, keepdims=True)

    p_t = softmax(teacher.astype(np.float64) / temperature)
    log_p_s = np.log(softmax(student.astype(np.float64) / temperature))
    expected = np.mean(-np.sum(p_t * log_p_s, axis=1))  # no tau**2 factor (SimCLRv2 eq. 3)
    fn = lambda s, t: losses.distillation_loss(s, t, temperature=temperature)
    value, (grad_s, grad_t) = jax.jit(jax.value_and_grad(fn, argnums=(0, 1)))(student, teacher)
    np.testing.assert_allclose(value, expected, rtol=1e-5)
    # d/ds: (P_S - P_T) / (tau * B); the teacher is a fixed target.
    p_s = softmax(student.astype(np.float64) / temperature)
    np.testing.assert_allclose(grad_s, (p_s - p_t) / (temperature * 5), rtol=1e-4, atol=1e-6)
    np.testing.assert_array_equal(grad_t, np.zeros_like(teacher))
    with pytest.raises(ValueError, match="temperature"):
        losses.distillation_loss(student, teacher, temperature=0.0)
