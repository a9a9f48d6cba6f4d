"""Published SimCLR checkpoints: the converted model reproduces the reference TF outputs of the
shared fixtures (TF1 with and without SK, TF2 in both key flavours, optimizer slots ignored),
architecture inference on other depths/widths, bad input, and the workdir the CLI writes is
usable by linear_eval, finetune, eval and load_embedder."""

from __future__ import annotations

import gzip
import json
import random
import re
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util
from helpers import OFFICIAL_CHECKPOINTS as FIXTURES
from helpers import require

from simclr_jax import convert

REPO = Path(__file__).resolve().parents[1]
TOLERANCE = 1e-4  # of each array's max magnitude, as the issue asks


@pytest.fixture(scope="session")
def fixtures_present() -> None:
    """Skips without the shared fixtures locally; CI must have them."""
    require(FIXTURES / "weight_rule.py", "the official-checkpoint fixtures")


def tf():
    import tensorflow

    return tensorflow


def save_v2(prefix: Path, tensors: dict) -> str:
    """Writes {key: array or bytes} as one TF checkpoint (what tf.train.Saver writes)."""
    t = tf()
    keys = list(tensors)
    values = [t.constant(tensors[k]) for k in keys]
    t.raw_ops.SaveV2(
        prefix=str(prefix), tensor_names=keys, shape_and_slices=[""] * len(keys), tensors=values
    )
    return str(prefix)


def read_tsv(path: Path) -> list[list[str]]:
    return [line.rstrip("\n").split("\t") for line in path.open()]


def weight_rule():
    sys.path.insert(0, str(FIXTURES))
    try:
        import weight_rule
    finally:
        sys.path.remove(str(FIXTURES))
    return weight_rule


def fixture_tensors(variant: str, *, extra_keys: bool, list_flavour: bool = False) -> dict:
    """The variant's checkpoint contents by the shared weight rule (README recipe); extra_keys
    adds the training checkpoint's zero /Momentum slots and global_step; list_flavour re-keys
    TF2 trainable variables as trainable_variables_list/N (what tf2/run.py save() writes)."""
    vdir = FIXTURES / variant
    make_weight = weight_rule().make_weight
    kn = vdir / "keras_names.tsv"
    rule_name = dict(read_tsv(kn)) if kn.exists() else {}
    tensors = {
        key: make_weight(rule_name.get(key, key), json.loads(shape))
        for key, shape, _ in read_tsv(vdir / "names.tsv")
    }
    if extra_keys:
        for key, shape, _ in read_tsv(vdir / "extra_keys.tsv"):
            if key == "global_step":
                tensors[key] = np.int64(250228)
            else:
                tensors[key] = np.zeros(json.loads(shape), np.float32)
    og = vdir / "object_graph.pb.gz"
    if og.exists():
        graph = gzip.decompress(og.read_bytes())
        if list_flavour:
            tensors, graph = rekey_trainable(tensors, graph)
        tensors["_CHECKPOINTABLE_OBJECT_GRAPH"] = graph
    return tensors


def rekey_trainable(tensors: dict, graph_bytes: bytes) -> tuple[dict, bytes]:
    """The other TF2 flavour: trainable variables keyed trainable_variables_list/N (N in a
    shuffled order, so no key text or order can be relied on), BN statistics keep their keys."""
    from tensorflow.core.protobuf import trackable_object_graph_pb2

    graph = trackable_object_graph_pb2.TrackableObjectGraph.FromString(graph_bytes)
    attrs = [a for n in graph.nodes for a in n.attributes if a.checkpoint_key in tensors]
    trainable = [a for a in attrs if not a.full_name.endswith(("moving_mean", "moving_variance"))]
    order = list(range(len(trainable)))
    random.Random(0).shuffle(order)
    out = {a.checkpoint_key: tensors[a.checkpoint_key] for a in attrs if a not in trainable}
    for n, attr in zip(order, trainable, strict=True):
        new_key = f"trainable_variables_list/{n}/.ATTRIBUTES/VARIABLE_VALUE"
        out[new_key] = tensors[attr.checkpoint_key]
        attr.checkpoint_key = new_key
    return out, graph.SerializeToString()


def relative_errors(out: dict, ref) -> dict[str, float]:
    return {k: float(np.max(np.abs(out[k] - ref[k])) / np.max(np.abs(ref[k]))) for k in ref.files}


VARIANTS = {
    # name: (fixture folder, extra keys, TF2 list flavour)
    "tf1_r50_1x_sk1": ("tf1_r50_1x_sk1", True, False),
    "tf1_r50_1x_sk0": ("tf1_r50_1x_sk0", True, False),
    "tf2_r50_1x_sk1": ("tf2_r50_1x_sk1", False, False),
    "tf2_r50_1x_sk1_list": ("tf2_r50_1x_sk1", False, True),
}


@pytest.fixture(scope="module", params=sorted(VARIANTS))
def converted(request, tmp_path_factory, fixtures_present):
    """One checkpoint build (150-180 MB) and conversion per variant."""
    folder, extra, list_flavour = VARIANTS[request.param]
    tmp = tmp_path_factory.mktemp(request.param)
    prefix = save_v2(
        tmp / "model.ckpt-250228",
        fixture_tensors(folder, extra_keys=extra, list_flavour=list_flavour),
    )
    result = convert.convert(str(tmp))  # the directory: the converter finds the prefix
    assert result.source == prefix
    return request.param, folder, result


@pytest.mark.usefixtures("fixtures_present")
def test_converted_fixture_matches_reference_outputs(converted):
    name, folder, result = converted
    ref = np.load(FIXTURES / folder / "outputs.npz")
    images = np.load(FIXTURES / folder / "input.npy")
    out = convert.named_outputs(result.variables, result.config, images)
    assert set(ref.files) <= set(out), set(ref.files) - set(out)
    errors = relative_errors(out, ref)
    assert max(errors.values()) < TOLERANCE, errors
    # The comparison is sharp: a swapped pair of layers is far outside it.
    assert np.max(np.abs(ref["final_avg_pool"])) > 1.0

    c = result.config.model
    meta = json.loads((FIXTURES / folder / "meta.json").read_text())["flags"]
    assert (c.resnet_depth, c.width_multiplier) == (meta["resnet_depth"], meta["width_multiplier"])
    assert c.sk_ratio == meta["sk_ratio"]
    assert (c.proj_head_mode, c.num_proj_layers, c.proj_out_dim) == ("nonlinear", 3, 128)
    assert c.num_classes == 1000
    num_vars = len(read_tsv(FIXTURES / folder / "names.tsv"))
    assert len(result.plan.pairs) == num_vars
    assert result.plan.initialized == []
    ignored = {v.name: v.note for v in result.plan.ignored}
    if VARIANTS[name][1]:  # every Momentum slot and global_step is listed as ignored
        extra = [k for k, _, _ in read_tsv(FIXTURES / folder / "extra_keys.tsv")]
        assert sorted(ignored) == sorted(extra)
        assert ignored["global_step"] == "global step"
        table = result.table()
        assert "base_model/conv2d/kernel/Momentum  [" in table
        assert "ignored (optimizer slot)" in table and f"# {len(extra)} ignored" in table
        # Without the extra keys the same variables go to the same places.
        shapes = fixture_shapes(folder)
        _, plain, _ = convert.plan_conversion({k: k for k in shapes}, shapes)
        assert [(v.key, d) for v, d in plain.pairs] == [(v.key, d) for v, d in result.plan.pairs]
    else:
        assert list(ignored) == ["_CHECKPOINTABLE_OBJECT_GRAPH"]


@pytest.mark.usefixtures("fixtures_present")
def test_selector_override_feeds_classifier_from_first_head_layer(converted):
    """Fine-tuned categories: --config.model.ft_proj_selector=1, the model's own logits."""
    _, folder, result = converted
    config = convert.make_config(
        convert.infer_architecture(_groups(result)), {"model.ft_proj_selector": 1}
    )
    images = np.load(FIXTURES / folder / "input.npy")
    ref = np.load(FIXTURES / folder / "outputs.npz")
    logits = convert.build_model(config).apply(result.variables, jnp.asarray(images))["logits"]
    scale = np.max(np.abs(ref["logits_sup_ft1"]))
    assert np.max(np.abs(np.asarray(logits) - ref["logits_sup_ft1"])) / scale < TOLERANCE
    assert np.max(np.abs(ref["logits_sup_ft1"] - ref["logits_sup"])) / scale > 0.1


def _groups(result):
    """The classified source variables of a conversion (from its plan)."""
    groups = {r: [] for r in ("conv", "bn", "proj_dense", "proj_bn", "sup", "ignored")}
    for var, _ in result.plan.pairs:
        groups[var.role].append(var)
    for role in ("conv", "bn"):
        groups[role].sort(key=lambda v: (v.index, v.leaf))
    return groups


# ------------------------------------------------------------------ other architectures


BLOCK_ORDER = {"shortcut": 0, "conv1": 1, "conv2": 2, "sk_conv": 2, "conv3": 3}
SK_ORDER = {"split_conv": 0, "reduce": 1, "expand": 2}


def creation_rank(module: str) -> tuple:
    """Where the reference creates a module: stem convs, then per stage and block the
    shortcut, conv1, the 3x3 (SK: split, squeeze, mixing) and conv3."""
    parts = module.split("/")[1:]  # drop 'encoder'
    if parts[0] == "stem":
        return (0, int(parts[1][-1]))
    stage, block = int(parts[0][5:]), int(parts[1][5:])
    inner = SK_ORDER.get(parts[3], 0) if parts[2] == "sk_conv" else 0
    return (stage, block, BLOCK_ORDER[parts[2]], inner)


def tf1_names(model_config: dict, num_classes: int | None, tf2_offset: int | None = None):
    """{TF name: (Flax path, shape)} for a model of our own, named as the reference names it
    (TF1, or TF2-style Keras names with process-global counters starting at tf2_offset)."""
    import ml_collections

    config = convert.default_config()
    config.model.update(model_config)
    if num_classes:
        config.model.num_classes = num_classes
    shapes = convert.abstract_variables(ml_collections.ConfigDict(config))
    convs = sorted(
        {
            p[len("params/") : -len("/kernel")]
            for p in shapes
            if re.match(r"params/encoder/.*kernel$", p)
        },
        key=creation_rank,
    )
    bns = sorted(
        {
            p[len("params/") : -len("/scale")]
            for p in shapes
            if re.match(r"params/encoder/.*scale$", p)
        },
        key=creation_rank,
    )
    tf2 = tf2_offset is not None
    names = {}
    suffix = lambda k: "" if k == 0 else f"_{k}"
    for k, module in enumerate(convs, start=tf2_offset or 0):
        name = (
            f"resnet/block/conv2d{suffix(k)}/kernel"
            if tf2
            else f"base_model/conv2d{suffix(k)}/kernel"
        )
        names[name] = f"params/{module}/kernel"
    bn_name = "resnet/block/sync_batch_normalization" if tf2 else "base_model/batch_normalization"
    for k, module in enumerate(bns, start=tf2_offset or 0):
        for tf_leaf, (collection, leaf) in convert.BN_LEAVES.items():
            names[f"{bn_name}{suffix(k)}/{tf_leaf}"] = f"{collection}/{module}/{leaf}"
    head = "projection_head" if tf2 else "head_contrastive"
    for path in shapes:
        m = re.match(r"(params|batch_stats)/projection_head/layer(\d+)/(dense|bn)/(\w+)$", path)
        if m:
            j = int(m.group(2)) - 1
            if m.group(3) == "dense":
                names[f"{head}/nl_{j}/dense/kernel"] = path
            else:
                tf_leaf = {v: k for k, v in convert.BN_LEAVES.items()}.get(
                    ("batch_stats" if m.group(1) == "batch_stats" else "params", m.group(4))
                )
                names[f"{head}/nl_{j}/batch_normalization/{tf_leaf}"] = path
    if num_classes:
        names["head_supervised/linear_layer/dense/kernel"] = "params/classifier/kernel"
        names["head_supervised/linear_layer/dense/bias"] = "params/classifier/bias"
    return {name: (path, tuple(shapes[path].shape)) for name, path in names.items()}


ARCHITECTURES = [
    # (depth, width, sk_ratio, cifar_stem, head layers, classes)
    (18, 1, 0.0, False, 2, 10),
    (34, 2, 0.0, False, 3, None),
    (101, 2, 0.0625, False, 3, 1000),
    (152, 3, 0.0625, False, 3, 1000),
    (200, 1, 0.0, False, 1, 100),
    (50, 4, 0.0, False, 2, 1000),
    (18, 1, 0.0, True, 3, 10),
    (18, 2, 0.0625, False, 2, 10),
    (50, 2, 0.0625, True, 3, None),
]


@pytest.mark.parametrize(
    "arch", ARCHITECTURES, ids=lambda a: "r{}_{}x_sk{}_cifar{}_h{}_c{}".format(*a)
)
@pytest.mark.parametrize("flavour", ["tf1", "tf2"])
def test_architecture_inferred_from_shapes_alone(arch, flavour):
    depth, width, sk_ratio, cifar_stem, layers, classes = arch
    model = dict(
        resnet_depth=depth,
        width_multiplier=width,
        sk_ratio=sk_ratio,
        cifar_stem=cifar_stem,
        num_proj_layers=layers,
        proj_out_dim=64,
    )
    named = tf1_names(model, classes, tf2_offset=7 if flavour == "tf2" else None)
    keys = list(named)
    random.Random(depth).shuffle(keys)  # checkpoint order says nothing about forward order
    shapes = {k: named[k][1] for k in keys}
    config, plan, _ = convert.plan_conversion({k: k for k in keys}, shapes)
    c = config.model
    assert (c.resnet_depth, c.width_multiplier, c.cifar_stem) == (depth, width, cifar_stem)
    assert c.sk_ratio == (convert.SK_RATIO if sk_ratio else 0.0)
    assert (c.num_proj_layers, c.proj_out_dim, c.proj_head_mode) == (layers, 64, "nonlinear")
    assert c.num_classes == (classes or 1000)
    assert {var.name: dest for var, dest in plan.pairs} == {k: v[0] for k, v in named.items()}
    assert plan.initialized == (
        [] if classes else ["params/classifier/bias", "params/classifier/kernel"]
    )


# ------------------------------------------------------------------ bad input


R50_SK1 = "tf1_r50_1x_sk1"


def fixture_shapes(variant: str) -> dict[str, tuple[int, ...]]:
    return {k: tuple(json.loads(s)) for k, s, _ in read_tsv(FIXTURES / variant / "names.tsv")}


def plan_error(shapes: dict) -> str:
    with pytest.raises(convert.ConversionError) as info:
        convert.plan_conversion({k: k for k in shapes}, shapes, where="ckpt")
    message = str(info.value)
    assert "\n" not in message
    return message


@pytest.mark.usefixtures("fixtures_present")
def test_missing_extra_and_misshapen_variables_are_named():
    shapes = fixture_shapes(R50_SK1)
    drop = dict(shapes)
    del drop["base_model/conv2d_40/kernel"]
    assert "between base_model/conv2d_39/kernel and base_model/conv2d_41/kernel" in plan_error(drop)
    drop = dict(shapes)
    del drop["base_model/conv2d_86/kernel"]
    assert "base_model/conv2d_85/kernel" in plan_error(drop)
    drop = dict(shapes)
    del drop["base_model/batch_normalization_12/beta"]
    assert "base_model/batch_normalization_12/beta is missing" in plan_error(drop)
    drop = dict(shapes)
    del drop["head_contrastive/nl_1/batch_normalization/gamma"]
    assert "head_contrastive/nl_1/batch_normalization/gamma is missing" in plan_error(drop)

    extra = dict(shapes, **{"base_model/conv2d_87/kernel": (1, 1, 2048, 2048)})
    assert "base_model/conv2d_87/kernel has no place in the inferred ResNet-50" in plan_error(extra)
    extra = dict(shapes, **{"head_contrastive/nl_2/batch_normalization/beta": (128,)})
    assert "head_contrastive/nl_2/batch_normalization/beta has no place" in plan_error(extra)
    extra = dict(shapes, **{"base_model/se/dense/kernel": (64, 4)})
    assert "base_model/se/dense/kernel" in plan_error(extra)

    bad = dict(shapes, **{"base_model/conv2d_30/kernel": (1, 1, 512, 999)})
    message = plan_error(bad)
    assert "base_model/conv2d_30/kernel has shape [1, 1, 512, 999]" in message
    assert "expects [1, 1, 512, 128] at params/encoder/stage2/block2/conv1" in message
    assert "ResNet-50 1x SK" in message
    bad = dict(shapes, **{"head_supervised/linear_layer/dense/kernel": (1024, 1000)})
    assert "head_supervised/linear_layer/dense/kernel has shape [1024, 1000]" in plan_error(bad)
    bad = dict(shapes, **{"base_model/conv2d/kernel": (3, 3, 3, 40)})
    assert "base_model/conv2d/kernel has shape [3, 3, 3, 40]" in plan_error(bad)

    other = {"bert/embeddings/word_embeddings": (30522, 768), "global_step": ()}
    assert "not a SimCLR ResNet checkpoint" in plan_error(other)
    with pytest.raises(convert.ConversionError, match="model.resnet_depth=101 contradicts"):
        convert.plan_conversion({k: k for k in shapes}, shapes, {"model.resnet_depth": 101})
    with pytest.raises(convert.ConversionError, match="ft_proj_selector=5"):
        convert.plan_conversion({k: k for k in shapes}, shapes, {"model.ft_proj_selector": 5})


@pytest.mark.usefixtures("fixtures_present")
def test_tf2_training_checkpoint_keys_are_ignored_by_key():
    """tf.train.Checkpoint(model=..., optimizer=...) adds optimizer state and slot keys."""
    folder = FIXTURES / "tf2_r50_1x_sk1"
    names = dict(read_tsv(folder / "keras_names.tsv"))
    shapes = fixture_shapes("tf2_r50_1x_sk1")
    slot = "model/resnet_model/variables/0/.OPTIMIZER_SLOT/optimizer/momentum"
    slot += "/.ATTRIBUTES/VARIABLE_VALUE"
    extra = {slot: (3, 3, 3, 32), "optimizer/iter/.ATTRIBUTES/VARIABLE_VALUE": ()}
    names.update({k: k for k in extra})
    _, plan, _ = convert.plan_conversion(names, {**shapes, **extra})
    assert sorted(v.key for v in plan.ignored) == sorted(extra)
    assert len(plan.pairs) == len(shapes)
    positional = {"model/resnet_model/variables/999/.ATTRIBUTES/VARIABLE_VALUE": (7,)}
    names.update({k: k for k in positional})
    message = plan_error_named(names, {**shapes, **positional})
    assert "model/resnet_model/variables/999/.ATTRIBUTES/VARIABLE_VALUE" in message
    assert "has no place in a SimCLR ResNet" in message


def plan_error_named(names: dict, shapes: dict) -> str:
    with pytest.raises(convert.ConversionError) as info:
        convert.plan_conversion(names, shapes)
    return str(info.value)


def test_checkpoint_paths_resolve(tmp_path):
    """SavedModel directory, TF1 directory (newest step without a 'checkpoint' file), prefix."""
    saved_model = tmp_path / "saved_model"
    (saved_model / "variables").mkdir(parents=True)
    save_v2(saved_model / "variables" / "variables", {"a": np.zeros(1, np.float32)})
    want = str(saved_model / "variables" / "variables")
    assert convert.resolve_prefix(str(saved_model) + "/") == want
    assert convert.resolve_prefix(want) == want
    tf1 = tmp_path / "tf1"
    for step in (900, 10000, 2000):
        save_v2(tf1 / f"model.ckpt-{step}", {"a": np.zeros(1, np.float32)})
    assert convert.resolve_prefix(str(tf1)) == str(tf1 / "model.ckpt-10000")
    (tf1 / "checkpoint").write_text('model_checkpoint_path: "model.ckpt-2000"\n')
    assert convert.resolve_prefix(str(tf1)) == str(tf1 / "model.ckpt-2000")


def test_unreadable_paths_are_named(tmp_path):
    for path in (str(tmp_path / "nothing"), str(tmp_path), "gs://simclr-jax-no-such-bucket/r50"):
        with pytest.raises(convert.ConversionError) as info:
            convert.convert(path)
        assert path in str(info.value) and "\n" not in str(info.value)


# ------------------------------------------------------------------ the converted workdir


@pytest.fixture(scope="module")
def smoke_checkpoint(tmp_path_factory):
    """A TF1 checkpoint of the smoke model (R18, 2-layer head -> 64, 10 classes) with random
    weights and BN statistics, Momentum slots and global_step; returns (prefix, variables)."""
    from configs import smoke

    config = smoke.get_config("finetune")
    named = tf1_names(
        {
            f: config.model[f]
            for f in ("resnet_depth", "width_multiplier", "num_proj_layers", "proj_out_dim")
        },
        10,
    )
    rng = np.random.default_rng(0)
    tensors, flat = {}, {}
    for name, (path, shape) in named.items():
        if path.endswith(("/var", "/scale")):
            value = rng.uniform(0.5, 1.5, shape)
        else:
            value = rng.normal(
                0.0, 0.1 if len(shape) == 1 else (1.0 / np.prod(shape[:-1])) ** 0.5, shape
            )
        tensors[name] = flat[path] = value.astype(np.float32)
        tensors[name + "/Momentum"] = np.zeros(shape, np.float32)
    tensors["global_step"] = np.int64(1234)
    prefix = save_v2(tmp_path_factory.mktemp("smoke_tf1") / "model.ckpt-1234", tensors)
    return prefix, traverse_util.unflatten_dict(flat, sep="/")


def test_cli_writes_nothing_on_bad_input(tmp_path, capsys):
    out = tmp_path / "out"
    assert convert.run_cli(str(tmp_path / "missing"), str(out)) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("simclr_jax.convert: error:") and "\n" not in err
    assert list(tmp_path.iterdir()) == []


@pytest.mark.end_to_end
def test_converted_workdir_serves_eval_linear_eval_finetune_and_embedder(
    smoke_checkpoint, tmp_path, capsys
):
    import ml_collections

    from configs import smoke
    from simclr_jax import checkpoint, data, dispatch, evaluate, parallel

    prefix, original = smoke_checkpoint
    out = tmp_path / "converted"
    assert convert.run_cli(prefix, str(out), {"model.ft_proj_selector": 1}) == 0
    table = capsys.readouterr().out
    stem = (
        r"\nbase_model/conv2d/kernel +\[7, 7, 3, 64\] +-> params/encoder/stem/conv1/conv/kernel\n"
    )
    assert re.search(stem, table), table[:500]
    assert "global_step  []  ignored (global step)" in table
    assert "base_model/conv2d_19/kernel/Momentum" in table
    assert sorted(p.name for p in tmp_path.iterdir()) == ["converted"]  # no temp dir left
    saved = json.loads((out / "config.json").read_text())
    assert saved["model"]["ft_proj_selector"] == 1 and saved["model"]["num_classes"] == 10

    # Python API: the same variables, bit for bit.
    variables, config = convert.load_tf_checkpoint(prefix, {"model.ft_proj_selector": 1})
    jax.tree.map(np.testing.assert_array_equal, variables, original)

    # load_embedder (what simclr_jax.embed uses) gives the original model's h.
    images = np.random.default_rng(1).uniform(size=(5, 16, 16, 3)).astype(np.float32)
    embed, loaded_config = evaluate.load_embedder(str(out))
    expected = convert.build_model(config).apply(original, jnp.asarray(images))
    np.testing.assert_allclose(embed(images), expected["h"], rtol=1e-5, atol=1e-5)
    assert loaded_config.model.resnet_depth == 18

    # eval: the converted classifier reads the first head layer (selector 1).
    cfg = smoke.get_config("eval")
    cfg.init_checkpoint = str(out)
    cfg.data.image_size = 16
    cfg.data.eval_split = "test[:10]"
    cfg.knn_eval = False
    results = dispatch.train_and_evaluate(cfg, str(tmp_path / "eval"))
    hits = count = 0
    for batch in data.make_eval_iterator(cfg.data, split="test[:10]", batch_size=200):
        logits = convert.build_model(config).apply(original, jnp.asarray(batch["image"]))["logits"]
        hits += float(np.sum((np.argmax(logits, -1) == batch["label"]) * batch["mask"]))
        count += float(np.sum(batch["mask"]))
    assert results["num_eval_examples"] == count == 100
    assert results["top1"] == pytest.approx(hits / count, abs=1e-6)

    # linear_eval and finetune start from it (2 steps each) and keep the converted encoder.
    for mode, selector in (("linear_eval", 0), ("finetune", 1)):
        cfg = smoke.get_config(mode)
        cfg.update_from_flattened_dict(
            {
                "init_checkpoint": str(out),
                "data.image_size": 16,
                "data.train_split": "train[:20]",
                "data.eval_split": "test[:10]",
                "train_batch_size": 16,
                "train_steps": 2,
                "checkpoint_every_steps": 2,
                "knn_eval": False,
                "model.ft_proj_selector": selector,
                "model.fine_tune_after_block": 4,
            }
        )
        workdir = tmp_path / mode
        results = dispatch.train_and_evaluate(cfg, str(workdir))
        assert results["step"] == 2 and np.isfinite(results["top1"])
        manager, step = checkpoint.open_for_restore(str(workdir))
        saved_cfg = ml_collections.ConfigDict(checkpoint.read_meta(manager, step)["config"])
        _, trained = evaluate.restore_model(manager, step, saved_cfg, parallel.create_mesh())
        jax.tree.map(
            np.testing.assert_array_equal,
            jax.device_get(trained["params"]["encoder"]),
            original["params"]["encoder"],
        )
        if selector:  # the first head layer was loaded, then trained a little
            got = jax.device_get(trained["params"]["projection_head"]["layer1"]["dense"]["kernel"])
            want = original["params"]["projection_head"]["layer1"]["dense"]["kernel"]
            assert np.corrcoef(np.ravel(got), np.ravel(want))[0, 1] > 0.99


def test_import_does_not_load_tensorflow():
    code = "import sys, simclr_jax, simclr_jax.convert; assert 'tensorflow' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO, timeout=120)
