"""Base configs: every field the trainers read, documented where it is defined.

The files in `configs/` start from these builders and change values; they never add
fields. Configs are locked, so a mistyped field on the command line (`--config.modle.depth=50`) is
an error naming it, and ml_collections rejects a value of the wrong type (`--config.batch_size=big`).
Derived values (the scaled learning rate, the number of steps, warmup steps) are computed by the
trainers, never stored here. The architecture fields of config.model are SimCLRModel's
(simclr_jax.models.simclr.ARCHITECTURE_FIELDS), listed there once.
"""

from __future__ import annotations

from ml_collections import config_dict

from simclr_jax.models.simclr import ARCHITECTURE_FIELDS, architecture_defaults

ConfigDict = config_dict.ConfigDict


def stage_of(config) -> str:
    """'distill', 'finetune' or 'pretrain': the stage a config (or a run's saved one, a dict) is
    for, from the fields only that stage's builder below has."""
    if "teacher_checkpoint" in config:
        return "distill"
    return "finetune" if "init_checkpoint" in config else "pretrain"


def dataset_config() -> ConfigDict:
    """Where images come from and what size the network sees."""
    c = ConfigDict()
    # 'fashion_mnist', 'cifar10', 'stl10', 'imagenet2012', any other tfds name, or 'folder' (own images).
    c.name = "fashion_mnist"
    # 'auto': the local Debian files when the dataset has them and they exist, else tfds.
    # 'local': only the local files; 'tfds': tensorflow_datasets; 'folder': an image folder at data_dir.
    c.source = "auto"
    # tfds data_dir, or the root of the image folder ('' = the library's default).
    c.data_dir = ""
    c.train_split = "train"  # split used for training (tfds slicing like 'train[:10%]' works).
    c.eval_split = "test"  # split used for evaluation ('' = no evaluation).
    c.image_size = 28  # side of the square crops the network sees.
    c.channels = 3  # image folders: 3 = RGB, 1 = grayscale (other sources: fixed by the data).
    c.bad_images = "skip"  # unreadable images in a folder: 'skip' (counted, reported) or 'error'.
    return c


def augment_config() -> ConfigDict:
    """SimCLR augmentations (reference values; applied on the accelerator inside the step)."""
    c = ConfigDict()
    # s: brightness, contrast, saturation 0.8s and hue 0.2s (1.0 ImageNet, 0.5 CIFAR).
    c.color_jitter_strength = 1.0
    c.use_blur = True  # Gaussian blur p=0.5, sigma in [0.1, 2]; off at 32 px and below (reference).
    c.crop_min_area = 0.08  # smallest area fraction of the random-resized crop.
    c.flip = True  # random horizontal flip.
    # Colour jitter's brightness: 'multiplicative' x * U[1-0.8s, 1+0.8s] (SimCLRv2, the reference
    # code's default) or 'additive' x + U[-0.8s, 0.8s] (SimCLR v1, the reference's impl='simclrv1').
    c.brightness = "multiplicative"
    return c


def model_config() -> ConfigDict:
    """The SimCLR network: ResNet backbone, projection head, classifier (see simclr_jax.models)."""
    # The architecture fields (depth, widths, head, BatchNorm constants, ...) with SimCLRModel's
    # defaults: simclr_jax.models.simclr declares and documents them, once.
    c = ConfigDict(architecture_defaults())
    # CIFAR stem (3x3 stride-1 conv, no max-pool); None = automatic (image_size <= 32).
    c.cifar_stem = config_dict.placeholder(bool)
    # Classifier input: 0 = backbone output, k = k-th projection layer, -1 = the last one.
    c.ft_proj_selector = 0
    c.zero_init_logits_layer = False  # start the classifier at zero.
    c.fine_tune_after_block = -1  # freeze stages up to k: -1 none, 0 stem, 1..4 block groups.
    # fine_tune_after_block=4 with ft_proj_selector >= 1: False (the reference) trains the head
    # layers up to the selector too; True trains only the classifier (finetune_model_config).
    c.freeze_head_in_linear_eval = False
    c.global_bn = True  # BatchNorm statistics over all replicas (the reference default).
    return c


def optim_config() -> ConfigDict:
    """Optimizer and learning-rate rule (see simclr_jax.optim)."""
    c = ConfigDict()
    # 'lars'; 'momentum' (the reference's: Nesterov, learning rate inside the velocity); 'sgd'
    # (optax heavy-ball momentum, learning rate after the buffer); 'adam'; 'adamw'. See optim.py.
    c.name = "lars"
    c.base_lr = 0.3  # learning rate before batch scaling.
    c.lr_scaling = "linear"  # 'linear': base_lr * batch / 256; 'sqrt': base_lr * sqrt(batch).
    # Weight decay as an L2 term wd * w added to the gradient (before LARS's trust ratio and
    # momentum): lars, sgd on kernels only; momentum, adam on every non-BatchNorm parameter, biases
    # included (the reference); adamw decoupled, kernels only.
    c.weight_decay = 1e-6
    c.momentum = 0.9  # momentum of LARS / SGD.
    c.trust_coefficient = 1e-3  # LARS trust coefficient (eta).
    c.warmup_epochs = 10.0  # linear warmup length, then cosine decay to zero.
    return c


def memory_config() -> ConfigDict:
    """SimCLRv2's MoCo-style memory of negatives (semantics in simclr_jax.memory); off for v1."""
    c = ConfigDict()
    # Keep a FIFO queue of an EMA network's projections (one view per image, from every replica)
    # as extra NT-Xent negatives; queue and EMA weights are part of the checkpointed state.
    c.enabled = False
    c.size = 65536  # queue length in keys (SimCLRv2: 64K); at least the global batch_size.
    c.ema_decay = 0.999  # EMA momentum d: ema = d * ema + (1 - d) * params after each update.
    return c


def pretrain_config() -> ConfigDict:
    """Contrastive pretraining with an online linear probe (simclr_jax.pretrain)."""
    c = ConfigDict()
    c.seed = 0  # seeds initialisation, data order and augmentation (all derived from (seed, step)).
    c.dataset = dataset_config()
    c.augment = augment_config()
    c.model = model_config()
    c.optim = optim_config()
    c.memory = memory_config()

    c.loss = ConfigDict()
    c.loss.temperature = 0.1  # NT-Xent temperature tau.

    c.probe = ConfigDict()
    # Peak learning rate (unscaled; warmup + cosine like the encoder) of the online linear probe's
    # own Adam optimizer, so it tracks the features whatever the encoder's optimizer does. 0 = train
    # it with the encoder's optimizer, as the reference does (with LARS at the reference's rates
    # that probe diverges: its loss runs in the hundreds).
    c.probe.learning_rate = 0.02
    # The probe trains on every `clean_every`-th image of each batch un-augmented: preprocessed as
    # for evaluation, through the network in inference mode, so it learns the features a linear
    # evaluation sees (on the views' crops and colours it ends lower: benchmarks/RESULTS.md).
    # Costs a forward pass of batch / clean_every images. 0 = the probe trains on the two views,
    # as the reference does. Needs whole images (in-memory data, not ImageNet's host crops).
    c.probe.clean_every = 4
    # Standardise the probe's input (a BatchNorm without scale or shift; its statistics are those
    # of the views' features): the probe converges in far fewer steps. False = the reference's
    # probe, a plain linear layer.
    c.probe.input_norm = True

    run_fields(c, num_epochs=100.0)
    # the online probe's exact top-1, the kNN monitor, the collapse monitor (train/collapse.py)
    c.evals = evals_config("probe", "knn", "collapse")
    return c


def lock(config: ConfigDict) -> ConfigDict:
    """Forbid new fields so a mistyped override is an error that names it."""
    config.lock()
    return config


def finetune_model_config() -> ConfigDict:
    """config.model of a run that starts from a checkpoint (fine-tuning, the distillation student).

    Architecture fields left at None come from the checkpoint's saved config (model_config()'s
    defaults when starting from scratch), so the user names only the workdir; a value set here
    wins, and a checkpoint that does not fit it is an error naming the mismatched parameters.
    """
    # Architecture: every field of model_config() that ARCHITECTURE_FIELDS lists, typed as there
    # and None = as the checkpoint (cifar_stem None in a checkpoint = automatic).
    defaults = model_config()
    c = ConfigDict(
        {name: config_dict.placeholder(defaults.get_type(name)) for name in ARCHITECTURE_FIELDS}
    )
    # What this run trains (never inherited):
    # classifier input: 0 = backbone output, k = output of the k-th head layer (SimCLRv2: 1),
    # -1 = the last head layer.
    c.ft_proj_selector = 0
    c.zero_init_logits_layer = False  # start the new classifier at zero (reference linear eval).
    # Freeze stem..block_group<k> (no updates, BN in inference mode): -1 none, 4 = the whole
    # backbone, i.e. linear evaluation (see freeze_head_in_linear_eval for the head).
    c.fine_tune_after_block = -1
    # Linear evaluation from a head layer (fine_tune_after_block=4, ft_proj_selector >= 1):
    # False (the reference) = the head layers up to the selector still train, their BN in
    # training mode (the reference stops the gradient only at the ResNet output); True = only
    # the classifier trains, on the inference-mode output of the frozen network (a linear probe).
    c.freeze_head_in_linear_eval = False
    c.global_bn = True  # BatchNorm statistics over all replicas.
    return c


def run_fields(c: ConfigDict, *, num_epochs: float) -> None:
    """Schedule, precision, parallelism and bookkeeping fields: every stage has these, once."""
    c.batch_size = 256  # global batch in images (pretraining: each gives two views); divides the
    # device count.
    # Split each device's batch (and labelled batch) into K chunks, one chunk's activations in
    # memory at a time, for one more forward pass. The update stays the whole batch's: pretraining
    # recomputes NT-Xent over all its negatives (simclr_jax/accumulation.py), fine-tuning and
    # distillation average their per-example losses. BatchNorm normalises each chunk with its own
    # statistics (ghost batch norm). Divides the per-device batch; 1 = one pass.
    c.accumulation_chunks = 1
    c.eval_batch_size = 1000  # global batch for evaluation (the last batch is padded and masked).
    c.num_epochs = num_epochs  # training length in epochs of the training split.
    c.num_steps = 0  # if > 0, overrides num_epochs.
    c.dtype = "float32"  # compute dtype 'float32' or 'bfloat16' (params, BN stats, loss stay fp32).
    # A NaN/inf loss: 'stop' (error naming the step; the last good checkpoint is kept) or 'skip'
    # (drop that step's update and go on; skipped steps are counted in the metrics).
    c.nonfinite = "stop"
    c.parallel = ConfigDict()
    c.parallel.backend = "shard_map"  # 'shard_map' (jax.shard_map under jax.jit) or 'pmap'.
    c.log_every_steps = 50  # metrics to the writers and progress (steps/s, ETA).
    # TensorBoard event files beside metrics.jsonl (needs TensorFlow, whose import slows every
    # process start; False: metrics.jsonl and log lines only).
    c.tensorboard = True
    c.checkpoint_every_steps = 1000  # orbax checkpoint period (and one at the end).
    c.keep_checkpoints = 3  # how many checkpoints to keep (an unreadable newest one falls back).


def evals_config(*names: str) -> ConfigDict:
    """config.evals: the evaluators training and the evaluation job run (train/evaluators.py),
    each named by its kind, with its cadence and fields."""
    c = ConfigDict()
    for name in names:
        c[name] = ConfigDict()
        # When it runs: every this many steps and after the last step; 0 = only after the last
        # step; < 0 = never.
        c[name].every_steps = 0
    if "knn" in names:
        # kNN on backbone features (cosine, temperature-weighted votes of the k nearest): its bank
        # is bank_size labelled training images, its queries the eval split; in-memory datasets.
        c.knn.k = 200  # neighbours that vote; 0 = no kNN monitor.
        c.knn.temperature = 0.1  # vote weight exp(similarity / temperature).
        c.knn.bank_size = 10_000  # labelled training images in the bank (class-balanced; 0 = all).
    return c


def every(evals: ConfigDict, steps: int) -> None:
    """Run every evaluator of `evals` every `steps` steps (and after the last one)."""
    for name in evals:
        evals[name].every_steps = steps


def finetune_config() -> ConfigDict:
    """Fine-tuning, linear evaluation and the supervised baseline (simclr_jax.finetune)."""
    c = ConfigDict()
    c.seed = 0  # seeds the new classifier, the data order and the augmentation.
    # Pretraining workdir to start from: weights only (params, BN statistics), and its saved
    # config gives the architecture. Required: 'none' = random initialisation (the supervised
    # recipes set it), '' = not given (fine-tuning stops with an error saying so).
    c.init_checkpoint = ""
    c.label_fraction = 1.0  # class-stratified fraction of the train split's labels, in (0, 1].
    c.label_seed = 0  # picks the labelled subset (the same on every host and for every seed).
    c.dataset = dataset_config()
    c.augment = ConfigDict()
    c.augment.crop_min_area = 0.08  # random-resized crop's smallest area (crop + flip only).
    c.augment.flip = True  # random horizontal flip.
    c.model = finetune_model_config()
    c.optim = optim_config()
    # Reference SimCLRv2 fine-tuning: LARS, lr 0.005 * sqrt(batch), no weight decay, no warmup.
    c.optim.base_lr = 0.005  # learning rate before batch scaling.
    c.optim.lr_scaling = "sqrt"  # 'linear' (base_lr * batch / 256) or 'sqrt'.
    c.optim.weight_decay = 0.0  # L2 weight decay (see optim_config).
    c.optim.warmup_epochs = 0.0  # linear warmup length, then cosine decay to zero.
    # LP-FT (train/classifier_init.py): start the classifier at the logistic regression of its
    # input features (init_checkpoint's network in inference mode, un-augmented labelled images,
    # L2 penalty by held-out folds) instead of zero_init_logits_layer's zero or random weights,
    # then fine-tune as configured. Needs init_checkpoint and an in-memory dataset.
    c.init_classifier_by_linear_fit = False
    run_fields(c, num_epochs=30.0)
    c.evals = evals_config("classifier", "knn")  # exact top-1/top-5 of the classifier, kNN
    c.evals.knn.bank_size = 0  # the bank: the whole labelled subset
    return c


def distill_config() -> ConfigDict:
    """Distillation of a fine-tuned teacher into a student on unlabelled data (simclr_jax.distill).

    loss = (1 - alpha) * distillation(unlabelled batch) + alpha * cross-entropy(labelled batch).
    """
    c = ConfigDict()
    c.seed = 0  # seeds the student, the data order and the augmentation.
    c.teacher_checkpoint = ""  # the fine-tuned teacher's workdir (required).
    # Pretraining workdir to initialise the student from (weights only); '' or 'none' = random
    # initialisation.
    c.init_checkpoint = ""
    c.temperature = 1.0  # tau of both softmaxes in the distillation loss.
    # Weight of the labelled cross-entropy; 0 = pure distillation (no label is ever read). Note
    # the SimCLRv2 paper's alpha weights the distillation term instead: ours = 1 - paper's.
    c.alpha = 0.0
    # Labelled subset (class-stratified fraction of train_split) for alpha > 0 and the kNN monitor.
    c.label_fraction = 1.0
    c.label_seed = 0  # picks the labelled subset (as in fine-tuning, so it is the same one).
    c.labeled_batch_size = 64  # labelled images per step when alpha > 0.
    c.dataset = dataset_config()  # train_split is the unlabelled pool the teacher labels.
    c.augment = ConfigDict()
    c.augment.crop_min_area = 0.08  # random-resized crop's smallest area (crop + flip only).
    c.augment.flip = True  # random horizontal flip.
    c.student = ConfigDict()
    # The student: architecture None = as init_checkpoint, else as the teacher (self-distillation).
    c.student.model = finetune_model_config()
    c.optim = optim_config()
    c.optim.base_lr = 0.1  # learning rate before batch scaling.
    c.optim.lr_scaling = "sqrt"  # 'linear' (base_lr * batch / 256) or 'sqrt'.
    c.optim.weight_decay = 1e-4  # L2 weight decay (see optim_config).
    c.optim.warmup_epochs = 1.0  # linear warmup length, then cosine decay to zero.
    run_fields(c, num_epochs=30.0)
    c.evals = evals_config("classifier", "teacher", "knn")  # the student, its teacher, kNN
    c.evals.knn.bank_size = 0  # the bank: the whole labelled subset
    return c
