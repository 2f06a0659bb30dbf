"""SimCLR v1 and SimCLRv2 in JAX/Flax: pretraining, fine-tuning and distillation.

A map of the package (the presets live in the checkout's top-level configs/, installed as
simclr_jax.configs):

    pretrain.py finetune.py distill.py   the three stages: make_stage (their pieces) and
                                          train_and_evaluate (handed to train/runner.py)
    models/      ResNets 18-200 (width, selective kernels, CIFAR stem), the demo's convnet, the
                 projection head, the composed SimCLRModel, fields checked in build.py, FLOPs
    losses.py optim.py memory.py parallel.py distributed.py predict.py
                 NT-Xent, LARS and schedules, SimCLRv2's memory of negatives, the data mesh and
                 mapped steps, multi-host start-up, the trained network's answer to images
    data/        sources (Fashion-MNIST files, tfds, folders, arrays), on-device augmentation,
                 views, device-resident and streamed batches, each stage's data, the catalog
    train/       the runner and its loop, state and update rules, checkpoints, the workdir lock,
                 preemption, metrics, the evaluators (one builder) and their scoring, linear fits
    planning/    compile-only plans for TPU slices and GPU machines (python -m simclr_jax.plan)
    official/    reading the released TF checkpoints (python -m simclr_jax.convert)
    commands     evaluate, embed, plan, convert, plot: thin modules over the above
    cli.py validation.py checks.py saved_run.py exception_chain.py
                 the shared command line, config checks, reading a workdir back into a model,
                 an error's causes as a traceback shows them (for one-line messages)

Studies and demos stand apart from the library (they use it, it never imports them): demo.py
(`make demo`), transfer_demo.py, and theory/ (the two-layer-CNN label-complexity study).
"""

__version__ = "0.1.0"


def load_encoder(*args, **kwargs):
    """(apply_fn, variables) for features from any stage's workdir; see simclr_jax.saved_run."""
    from simclr_jax.saved_run import load_encoder as load

    return load(*args, **kwargs)
