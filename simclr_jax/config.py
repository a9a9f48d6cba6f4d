"""The config schema: every field with its default (get_base_config), and the one grammar of
the `file.py:arg` argument that the experiment configs in configs/ accept (parse_arg).

Experiment configs start from get_base_config() and change fields; nothing else names fields.
"""

from __future__ import annotations

import dataclasses
import re

import ml_collections

MODES = ("pretrain", "linear_eval", "finetune", "distill", "eval")
# 'r50_1x', 'r152_3x_sk', 'r18_1x' ... -> depth, width, selective kernels.
MODEL_TOKEN = re.compile(r"^r(\d+)_(\d)x(_sk)?$")
VERSIONS = ("v1", "v2")


def get_base_config() -> ml_collections.ConfigDict:
    """Returns the full config schema with the SimCLR ImageNet defaults."""
    config = ml_collections.ConfigDict()
    config.mode = "pretrain"  # pretrain | linear_eval | finetune | distill | eval
    config.seed = 0

    # Durations: give steps or epochs (steps win when > 0); converted in loop.py only.
    config.train_batch_size = 4096
    config.eval_batch_size = 1024
    config.train_epochs = 100
    config.train_steps = 0
    config.warmup_epochs = 10.0
    config.warmup_steps = 0
    config.log_every_steps = 100
    config.eval_every_steps = 0  # 0: only at the end
    config.checkpoint_every_steps = 5000
    config.keep_checkpoints = 3
    config.knn_eval = True  # weighted kNN (k=200) on the eval split at the end
    config.knn_k = 200
    config.knn_temperature = 0.1

    # Where linear_eval / finetune / eval read weights from.
    config.init_checkpoint = ""  # a workdir or its checkpoints/ directory
    config.init_checkpoint_step = -1  # -1: latest

    # fsdp_min_size > 0 shards parameters and optimizer state with at least that many elements
    # over the data axis (FSDP) for models that do not fit replicated; 0 replicates everything.
    # num_slices: 0 takes the slices the devices carry (TPU multislice: a hybrid mesh, DCN
    # between slices); on CPU/GPU N > 1 makes each of N processes stand for one slice.
    config.mesh = ml_collections.ConfigDict(
        {"data": -1, "model": 1, "fsdp_min_size": 0, "num_slices": 0}
    )

    config.model = ml_collections.ConfigDict()
    config.model.resnet_depth = 50  # 18 34 50 101 152 200
    config.model.width_multiplier = 1  # integer 1-4
    config.model.sk_ratio = 0.0  # SimCLRv2 selective kernels (0.0625), switches on ResNet-D
    config.model.se_ratio = 0.0  # squeeze-excitation, 0 = off
    # 3x3/1 stem, no max-pool: True | False | 'auto' (on when data.image_size <= 32, the
    # reference's rule). Typed object so that all three override it, also on the command line.
    config.model.cifar_stem = ml_collections.FieldReference("auto", field_type=object)
    config.model.bn_momentum = 0.9
    config.model.bn_epsilon = 1e-5
    config.model.dtype = "float32"  # float32 | bfloat16 (params and batch stats stay float32)
    # auto: im2col kernel gradient on CPU, XLA's own on TPU/GPU | xla | im2col (models/conv.py)
    config.model.conv_kernel_grad = "auto"
    # Recompute residual blocks in the backward pass to save activation memory: none | block
    # (keep block inputs only) | conv_outputs (keep conv outputs, recompute BN/ReLU) | dots
    # (JAX's dots_saveable). docs/preflight.md measures each.
    config.model.remat = "none"
    config.model.proj_head_mode = "nonlinear"  # none | linear | nonlinear
    config.model.num_proj_layers = 3  # v1: 2, v2: 3
    config.model.proj_out_dim = 128
    config.model.ft_proj_selector = 0  # head layer the classifier reads when fine-tuning
    config.model.fine_tune_after_block = -1  # -1 train all; 4 = frozen encoder (linear eval)
    config.model.zero_init_logits_layer = False
    config.model.num_classes = 1000  # overwritten from the dataset when known

    # mode 'distill' (SimCLRv2 stage 3): a frozen fine-tuned teacher labels the unlabeled
    # train split; the student (this config's model) is init_checkpoint's encoder or scratch.
    config.distill = ml_collections.ConfigDict()
    config.distill.teacher_checkpoint = ""  # a fine-tuned workdir (or its checkpoints/)
    config.distill.teacher_checkpoint_step = -1  # -1: latest
    config.distill.temperature = 1.0  # tau of both softmaxes
    config.distill.alpha = 1.0  # weight of the distillation term; 1 - alpha: labelled CE
    config.distill.labeled_split = ""  # split of the labelled term (alpha < 1), e.g. 'train'
    config.distill.label_subset = ""  # its label subset ('1pct', '10pct', a file), like data.*

    config.loss = ml_collections.ConfigDict()
    config.loss.temperature = 0.1
    config.loss.hidden_norm = True

    config.optim = ml_collections.ConfigDict()
    config.optim.optimizer = "lars"  # lars | momentum | adam
    config.optim.learning_rate = 0.3  # base LR, scaled by lr_scaling
    config.optim.lr_scaling = "linear"  # linear: base*B/256 | sqrt: base*sqrt(B) | none
    config.optim.weight_decay = 1e-6
    config.optim.momentum = 0.9
    config.optim.nesterov = False  # momentum optimizer only
    config.optim.trust_coefficient = 0.001  # LARS eta
    # LR of the supervised head (online probe / classifier) relative to the schedule's; the
    # reference trains it at the full LR (1.0). Not a reference knob: for small smoke runs.
    config.optim.classifier_lr_scale = 1.0

    config.data = ml_collections.ConfigDict()
    # tfdata: tf.data decodes and augments on the host. jax: TF-free Grain loader (Pillow,
    # NumPy; the random crop on the full-resolution image on the host) and the rest of the
    # augmentation on the accelerator; no TensorFlow is imported, and metrics go to
    # metrics.jsonl instead of TensorBoard (no tfds source).
    config.data.backend = "tfdata"
    config.data.grain_workers = 0  # backend=jax: decoding processes (0: threads in-process)
    config.data.grain_threads = 0  # backend=jax: threads per process (0: one per CPU, <= 16)
    config.data.source = "tfds"  # bundled | tfds | folder | numpy (backend=jax only)
    config.data.name = "imagenet2012"  # tfds builder name (source=tfds)
    config.data.data_dir = ""  # tfds data_dir or image-folder root; local or gs://
    config.data.train_split = "train"
    config.data.eval_split = "validation"
    config.data.label_subset = ""  # "", "1pct", "10pct" or a file of image names
    config.data.image_size = 224
    config.data.shuffle_buffer = 10_000
    config.data.deterministic = False  # batch at step k depends only on (seed, k)
    config.data.skip_corrupt = True  # False: a corrupt image is a hard error
    config.data.color_jitter_strength = 1.0
    config.data.brightness_mode = "simclrv2"  # simclrv2 (multiplicative) | simclrv1 (additive)
    config.data.crop_min_area = 0.08
    config.data.flip_prob = 0.5
    config.data.color_jitter_prob = 0.8
    config.data.grayscale_prob = 0.2
    config.data.blur_prob = 0.5  # 0 switches blur off (CIFAR)
    return config


@dataclasses.dataclass(frozen=True)
class ConfigArg:
    """A parsed `file.py:arg`: the chosen variant, model token, recipe version, epochs, flags."""

    variant: str | None = None
    model: str | None = None
    version: str | None = None
    epochs: int | None = None
    flags: frozenset[str] = frozenset()

    @property
    def runlocal(self) -> bool:
        """True when the tiny CPU variant was asked for."""
        return "runlocal" in self.flags


def parse_arg(
    arg: str | None,
    name: str,
    *,
    variants: tuple[str, ...] = (),
    flags: tuple[str, ...] = (),
    model: bool = False,
    version: bool = False,
    epochs: bool = False,
) -> ConfigArg:
    """Splits a config file's comma-separated arg ('r50_1x,runlocal', 'val', 'finetune') into a
    ConfigArg. Tokens: at most one of `variants`, any of `flags`, and, where enabled, a model
    (rDEPTH_WIDTHx[_sk]), v1|v2 and eNNN epochs. ValueError naming the file, token and choices."""
    accepted = [
        *(["a model like r50_1x or r152_3x_sk"] if model else []),
        *(["|".join(VERSIONS)] if version else []),
        *(["eNNN (epochs)"] if epochs else []),
        *([" | ".join(variants)] if variants else []),
        *flags,
    ]
    parsed: dict = {"flags": set()}
    for token in [t.strip() for t in (arg or "").split(",") if t.strip()]:
        if token in flags:
            parsed["flags"].add(token)
        elif token in variants and "variant" not in parsed:
            parsed["variant"] = token
        elif model and MODEL_TOKEN.match(token):
            parsed["model"] = token
        elif version and token in VERSIONS:
            parsed["version"] = token
        elif epochs and re.fullmatch(r"e\d+", token):
            parsed["epochs"] = int(token[1:])
        else:
            raise ValueError(
                f"{name} arg token {token!r} is not understood; accepted: "
                f"{', '.join(accepted) or 'none'} (comma separated"
                f"{'; at most one of ' + ' | '.join(variants) if variants else ''})."
            )
    parsed["flags"] = frozenset(parsed["flags"])
    return ConfigArg(**parsed)
