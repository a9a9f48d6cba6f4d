"""Export to PyTorch: the exported module equals the JAX model (random weights, every feature of
the architecture), torchvision's ResNet-50 loads its export strictly and comes as close as the
docs say, the published-checkpoint fixtures go TF -> workdir -> torch with the reference's
outputs, writing needs no torch, and bad input is one line with nothing written."""

from __future__ import annotations

import importlib
import importlib.util
import io
import json
import os
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

from simclr_jax import checkpoint, convert, export
from simclr_jax.config import get_base_config
from simclr_jax.models import create_model

REPO = Path(__file__).resolve().parents[1]
EXACT = 1e-5  # of the largest magnitude: the exported module computes what the JAX model does
FIXTURE_TOLERANCE = 1e-4  # against the reference TF outputs, as tests/test_convert.py


def need_torch(name: str = "torch"):
    """torch (or torchvision), or a skip on a user's machine without it; CI installs both
    (tests/run.sh) and must run these tests."""
    if name == "torchvision" and "tensorflow" in sys.modules and "triton" not in sys.modules:
        # torchvision.ops imports torch._dynamo, which imports triton if installed (torch's
        # Linux wheels depend on it), and libtriton crashes the process when TensorFlow was
        # loaded first. Nothing here compiles: torch then runs without triton.
        sys.modules["triton"] = None
    try:
        module = importlib.import_module(name)
    except ImportError:
        if os.environ.get("CI"):
            pytest.fail(f"CI must install {name} (tests/run.sh installs requirements/torch.txt)")
        pytest.skip(f"{name} is not installed (pip install '.[torch]')")
    if name == "torch":
        module.set_num_threads(2)
    return module


def relative_error(a, b) -> float:
    """max |a - b| over the largest magnitude of b."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.max(np.abs(a - b)) / np.max(np.abs(b)))


def make_config(mode: str = "pretrain", image_size: int = 32, **model) -> object:
    config = get_base_config()
    config.mode = mode
    config.data.image_size = image_size
    config.model.cifar_stem = False
    config.model.num_classes = 10
    config.model.update(model)
    return config


def random_variables(config, seed: int = 0) -> dict:
    """Every parameter and batch statistic random (no zero-initialized residual branch, BN
    statistics away from 0 and 1), scaled so activations stay O(1) through deep networks."""
    model = create_model(
        config.model, num_classes=config.model.num_classes, mode=convert.model_mode(config)
    )
    size = config.data.image_size
    shapes = jax.eval_shape(
        lambda: model.init(jax.random.key(0), jnp.zeros((1, size, size, 3)), train=False)
    )
    rng = np.random.default_rng(seed)
    flat = {}
    for key, s in traverse_util.flatten_dict(dict(shapes), sep="/").items():
        leaf = key.rsplit("/", 1)[-1]
        if leaf == "kernel":
            fan_in = int(np.prod(s.shape[:-1]))
            value = rng.normal(0.0, 1.0 / np.sqrt(fan_in), s.shape)
        elif leaf in ("scale", "var"):
            value = rng.uniform(0.5, 1.5, s.shape)
        else:  # bias, mean
            value = rng.normal(0.0, 0.2, s.shape)
        flat[key] = value.astype(np.float32)
    return traverse_util.unflatten_dict(flat, sep="/")


def write_workdir(path: Path, config, variables: dict, step: int = 7) -> Path:
    """A workdir as training leaves it: checkpoints/<step>/{state, meta}."""
    manager = checkpoint.create_manager(path, keep=1, use_async=False)
    meta = {"config": config.to_dict(), "step": step, "data_position": 0, "mode": config.mode}
    checkpoint.save(manager, step, {"step": np.int32(step), **variables}, meta)
    manager.wait_until_finished()
    manager.close()
    return path


def jax_outputs(config, variables, images: np.ndarray) -> dict:
    model = create_model(
        config.model, num_classes=config.model.num_classes, mode=convert.model_mode(config)
    )
    out = model.apply(variables, jnp.asarray(images), train=False)
    return {k: np.asarray(v) for k, v in out.items()}


def load_module(directory: Path):
    """The exported simclr_resnet.py, imported from its file under a unique name."""
    name = f"simclr_resnet_{abs(hash(str(directory)))}"
    spec = importlib.util.spec_from_file_location(name, directory / export.MODULE_FILE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def torch_outputs(directory: Path, images: np.ndarray) -> dict:
    torch = need_torch()
    model = load_module(directory).load(str(directory))
    assert not model.training
    with torch.no_grad():
        out = model(torch.from_numpy(np.ascontiguousarray(images.transpose(0, 3, 1, 2))))
    return {k: out[k].numpy() for k in ("h", "z", "logits")}


def bundled_test_images(count: int) -> tuple[np.ndarray, np.ndarray]:
    """The first `count` bundled CIFAR-10 test images (N, 32, 32, 3) in [0, 1] and labels."""
    from PIL import Image

    from simclr_jax.data.sources import load_bundled_arrays

    arrays = load_bundled_arrays()
    blob, offsets = arrays["test_jpeg"].tobytes(), arrays["test_offsets"]
    images = [
        np.asarray(Image.open(io.BytesIO(blob[offsets[i] : offsets[i + 1]])).convert("RGB"))
        for i in range(count)
    ]
    return np.stack(images).astype(np.float32) / 255.0, arrays["test_labels"][:count]


# ------------------------------------------------------------------ torch format, random weights

CASES = {
    # name: (mode, image size, model fields)
    "r50_1x": ("pretrain", 32, dict(resnet_depth=50)),
    # odd stem maps (36 px -> 18 -> 9): the 'SAME' pools pad (1, 1); classifier on head layer 1
    "r50_1x_sk": (
        "finetune",
        36,
        dict(resnet_depth=50, sk_ratio=0.0625, ft_proj_selector=1, fine_tune_after_block=2),
    ),
    "r50_2x": ("pretrain", 32, dict(resnet_depth=50, width_multiplier=2, num_proj_layers=2)),
    "r18_cifar_se": (
        "linear_eval",
        16,
        dict(
            resnet_depth=18,
            cifar_stem="auto",
            se_ratio=0.25,
            proj_head_mode="linear",
            fine_tune_after_block=4,
        ),
    ),
    "r101": ("distill", 32, dict(resnet_depth=101, proj_head_mode="none", proj_out_dim=64)),
}


SLOW_CASES = ("r101", "r50_2x")  # about 30 s each on 2 busy cores


@pytest.mark.parametrize(
    "case",
    [pytest.param(c, marks=pytest.mark.slow) if c in SLOW_CASES else c for c in sorted(CASES)],
)
def test_torch_export_equals_jax(case, tmp_path):
    need_torch()
    mode, size, fields = CASES[case]
    config = make_config(mode, size, **fields)
    variables = random_variables(config)
    workdir = write_workdir(tmp_path / "work", config, variables)
    out = tmp_path / "export"
    files = export.export(str(workdir), str(out), "torch")
    assert files == sorted(["README.md", "config.json", "model.safetensors", "simclr_resnet.py"])
    info = json.loads((out / "config.json").read_text())
    assert (info["step"], info["mode"]) == (7, mode)
    assert info["source_workdir"] == str(workdir)

    images = np.random.default_rng(1).uniform(0, 1, (2, size, size, 3)).astype(np.float32)
    expected = jax_outputs(config, variables, images)
    got = torch_outputs(out, images)
    for key in ("h", "z", "logits"):
        assert got[key].shape == expected[key].shape, key
        assert relative_error(got[key], expected[key]) < EXACT, key
    # Not vacuous: the outputs vary between the two images.
    assert relative_error(expected["h"][0], expected["h"][1]) > 1e-3


# ------------------------------------------------------------------ published-checkpoint fixtures

FIXTURE_VARIANTS = ("tf1_r50_1x_sk0", "tf1_r50_1x_sk1", "tf2_r50_1x_sk1")


@pytest.fixture(scope="module")
def converted_workdirs(tmp_path_factory) -> dict[str, Path]:
    """TF checkpoint (rebuilt by the fixtures' weight rule) -> simclr_jax.convert workdir."""
    require(FIXTURES / "weight_rule.py", "the official-checkpoint fixtures")
    from test_convert import fixture_tensors, save_v2

    workdirs = {}
    for variant in FIXTURE_VARIANTS:
        tmp = tmp_path_factory.mktemp(variant)
        save_v2(tmp / "model.ckpt-250228", fixture_tensors(variant, extra_keys="tf1" in variant))
        workdirs[variant] = convert.write_workdir(convert.convert(str(tmp)), str(tmp / "work"))
    return workdirs


@pytest.mark.slow
@pytest.mark.parametrize("variant", FIXTURE_VARIANTS)
def test_published_fixture_tf_to_workdir_to_torch(variant, converted_workdirs, tmp_path):
    """The exported module reproduces the reference TensorFlow code's h, z and logits."""
    need_torch()
    out = tmp_path / "export"
    assert export.main(["--workdir", str(converted_workdirs[variant]), "--out", str(out)]) == 0
    ref = np.load(FIXTURES / variant / "outputs.npz")
    got = torch_outputs(out, np.load(FIXTURES / variant / "input.npy"))
    assert got["h"].shape == (4, 2048)
    assert relative_error(got["h"], ref["final_avg_pool"]) < FIXTURE_TOLERANCE
    assert relative_error(got["z"], ref["proj_head_output"]) < FIXTURE_TOLERANCE
    assert relative_error(got["logits"], ref["logits_sup"]) < FIXTURE_TOLERANCE


@pytest.mark.slow
def test_torchvision_resnet50_loads_strictly_and_comes_as_close_as_documented(
    converted_workdirs, tmp_path
):
    """The converted ResNet-50 fixture (no selective kernels) in torchvision's layout: strict
    load of the safetensors and the .pth; h as close as the docs state with torchvision's own
    max-pool, and equal to the JAX model's with the README's one-line pool patch."""
    torch, torchvision = need_torch(), need_torch("torchvision")
    from safetensors.torch import load_file

    workdir = converted_workdirs["tf1_r50_1x_sk0"]
    out = tmp_path / "tv"
    files = export.export(str(workdir), str(out), "torchvision")
    assert {"resnet50.safetensors", "resnet50.pth", "projection_head.safetensors"} <= set(files)
    readme = (out / "README.md").read_text()
    assert str(workdir) in readme and "step 0" in readme and "[0, 1]" in readme

    model = torchvision.models.resnet50(num_classes=1000).eval()
    state = load_file(str(out / "resnet50.safetensors"))
    model.load_state_dict(state, strict=True)
    from_pth = torch.load(str(out / "resnet50.pth"), weights_only=True)
    assert sorted(from_pth) == sorted(state)
    assert all(torch.equal(from_pth[k], state[k]) for k in state)

    ref = np.load(FIXTURES / "tf1_r50_1x_sk0" / "outputs.npz")
    fixture_input = np.load(FIXTURES / "tf1_r50_1x_sk0" / "input.npy")
    source = export.read_source(str(workdir))
    config, variables = source.config, source.variables
    assert (
        relative_error(jax_outputs(config, variables, fixture_input)["h"], ref["final_avg_pool"])
        < FIXTURE_TOLERANCE
    )
    small, _ = bundled_test_images(16)
    large = np.asarray(jax.image.resize(small[:3], (3, 224, 224, 3), "bicubic")).clip(0, 1)

    def torchvision_outputs(images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        features = {}
        hook = model.avgpool.register_forward_hook(lambda m, i, o: features.update(h=o))
        with torch.no_grad():
            logits = model(torch.from_numpy(images.transpose(0, 3, 1, 2).copy()))
        hook.remove()
        return features["h"].flatten(1).numpy(), logits.numpy()

    expected = {size: jax_outputs(config, variables, x) for size, x in ((32, small), (224, large))}
    for size, images in ((32, small), (224, large)):
        error = relative_error(torchvision_outputs(images)[0], expected[size]["h"])
        # torchvision's pool is a pixel off: a real difference, no larger than stated.
        assert 1e-3 < error <= export.TORCHVISION_H_ERROR[size], (size, error)

    model.maxpool = torch.nn.Sequential(torch.nn.ZeroPad2d((0, 1, 0, 1)), torch.nn.MaxPool2d(3, 2))
    for size, images in ((32, small), (224, large)):
        h, logits = torchvision_outputs(images)
        assert relative_error(h, expected[size]["h"]) < EXACT
        assert relative_error(logits, expected[size]["logits"]) < EXACT
    h, expected = torchvision_outputs(small)[0], expected[32]

    head = torch.nn.Sequential(
        torch.nn.Linear(2048, 2048, bias=False),
        torch.nn.BatchNorm1d(2048),
        torch.nn.ReLU(),
        torch.nn.Linear(2048, 2048, bias=False),
        torch.nn.BatchNorm1d(2048),
        torch.nn.ReLU(),
        torch.nn.Linear(2048, 128, bias=False),
        torch.nn.BatchNorm1d(128),
    ).eval()
    head.load_state_dict(load_file(str(out / "projection_head.safetensors")), strict=True)
    with torch.no_grad():
        z = head(torch.from_numpy(h)).numpy()
    assert relative_error(z, expected["z"]) < EXACT


# ------------------------------------------------------------------ writing, bad input


@pytest.fixture(scope="module")
def small_workdirs(tmp_path_factory) -> dict[str, Path]:
    """A tiny ResNet-18 CIFAR workdir and a ResNet-50 with selective kernels (16 px)."""
    tmp = tmp_path_factory.mktemp("small")
    workdirs = {}
    for name, fields in (
        ("r18", dict(resnet_depth=18, cifar_stem=True)),
        ("r50_sk", dict(resnet_depth=50, sk_ratio=0.0625)),
    ):
        config = make_config("pretrain", 16, **fields)
        workdirs[name] = write_workdir(tmp / name, config, random_variables(config), step=3)
    return workdirs


def test_export_writes_without_torch_and_reads_nothing_of_it(small_workdirs, tmp_path):
    """A process where `import torch` fails writes a complete export."""
    out = tmp_path / "out"
    args = ["--workdir", str(small_workdirs["r18"]), "--out", str(out)]
    script = (
        "import sys; sys.modules['torch'] = None\n"
        "from simclr_jax import export\n"
        f"code = export.main({args!r})\n"
        "assert 'torch' not in {m.split('.')[0] for m in sys.modules if sys.modules[m]}\n"
        "sys.exit(code)\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, cwd=REPO, timeout=300
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert sorted(os.listdir(out)) == sorted(
        ["README.md", "config.json", "model.safetensors", "simclr_resnet.py"]
    )
    from safetensors.numpy import load_file

    state = load_file(str(out / "model.safetensors"))
    assert state["encoder.stem.conv1.conv.weight"].shape == (64, 3, 3, 3)  # OIHW
    assert state["encoder.stem.conv1.bn.num_batches_tracked"].dtype == np.int64
    assert json.loads((out / "config.json").read_text())["model"]["cifar_stem"] is True


def test_pth_writer_round_trips_through_torch_load(tmp_path):
    torch = need_torch()
    arrays = {
        "w": np.arange(24, dtype=np.float32).reshape(2, 3, 4),
        "b": np.linspace(-1, 1, 5, dtype=np.float32),
        "n": np.zeros((), np.int64),
        "t": np.ones((3, 2), np.float32).T,  # not contiguous: written C-ordered
    }
    export.save_pth(str(tmp_path / "x.pth"), arrays)
    loaded = torch.load(str(tmp_path / "x.pth"), weights_only=True)
    assert list(loaded) == list(arrays)
    for key, value in arrays.items():
        assert (
            loaded[key].dtype
            == {np.float32: torch.float32, np.int64: torch.int64}[value.dtype.type]
        )
        assert tuple(loaded[key].shape) == value.shape, key
        np.testing.assert_array_equal(loaded[key].numpy(), value)
    mapped = torch.load(str(tmp_path / "x.pth"), weights_only=True, mmap=True)
    np.testing.assert_array_equal(mapped["w"].numpy(), arrays["w"])


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "simclr_jax.export", *args],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=300,
    )


def test_bad_input_is_one_line_exit_2_and_nothing_written(small_workdirs, tmp_path, capsys):
    sk, r18 = str(small_workdirs["r50_sk"]), str(small_workdirs["r18"])
    occupied = tmp_path / "occupied"
    occupied.mkdir()
    (occupied / "keep.txt").write_text("mine")
    cases = {
        "torchvision for selective kernels": (
            ["--workdir", sk, "--out", str(tmp_path / "a"), "--format", "torchvision"],
            "selective kernels",
        ),
        "torchvision for ResNet-18": (
            ["--workdir", r18, "--out", str(tmp_path / "a"), "--format=torchvision"],
            "ResNet-50/101/152",
        ),
        "unknown format": (
            ["--workdir", r18, "--out", str(tmp_path / "a"), "--format=onnx"],
            "--format=onnx",
        ),
        "missing workdir": (
            ["--workdir", str(tmp_path / "nope"), "--out", str(tmp_path / "a")],
            "does not exist",
        ),
        "workdir without checkpoints": (
            ["--workdir", str(occupied), "--out", str(tmp_path / "a")],
            "does not exist",
        ),
        "missing step": (
            ["--workdir", r18, "--out", str(tmp_path / "a"), "--step", "5"],
            "--step=5 is not in",
        ),
        "occupied out dir": (["--workdir", r18, "--out", str(occupied)], "not an empty directory"),
    }
    for name, (args, words) in cases.items():
        assert export.main(args) == 2, name
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and words in err, (name, err)
        assert not (tmp_path / "a").exists(), name
    assert os.listdir(occupied) == ["keep.txt"] and (occupied / "keep.txt").read_text() == "mine"
    assert not [p for p in os.listdir(tmp_path) if ".exporting-" in p]

    # The real command line: argparse errors too are one line with exit status 2.
    result = run_cli("--workdir", sk, "--out", str(tmp_path / "a"), "--format", "torchvision")
    assert result.returncode == 2 and result.stderr.count("\n") == 1, result.stderr
    assert "use --format=torch" in result.stderr
    result = run_cli("--out", str(tmp_path / "a"))
    assert result.returncode == 2 and result.stderr.count("\n") == 1, result.stderr
    assert not (tmp_path / "a").exists()


def test_empty_out_dir_is_used_and_the_step_is_recorded(small_workdirs, tmp_path):
    out = tmp_path / "empty"
    out.mkdir()
    export.export(str(small_workdirs["r18"]), str(out), "torch", step=3)
    info = json.loads((out / "config.json").read_text())
    assert info["step"] == 3 and info["format"] == "torch"
    readme = (out / "README.md").read_text()
    assert "step 3" in readme and str(out) in readme and "no mean/std" in readme


def test_the_torch_module_file_repeats_the_models_tables():
    """The exported module file stands alone (it cannot import simclr_jax), so its copies of
    the architecture tables must equal the model's."""
    pytest.importorskip("torch")
    from simclr_jax import export_torch_module
    from simclr_jax.models import resnet

    assert export_torch_module.STAGE_SIZES == resnet.STAGE_SIZES
    assert export_torch_module.SK_MIN_DIM == resnet.SK_MIN_DIM
