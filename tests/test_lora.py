import dataclasses
import glob
import json
import os

import numpy as np
import pytest

from gpt_keras import GPT, GPTConfig, checkpoints, lora
from gpt_keras.cli import main
from gpt_keras.config import TrainConfig
from gpt_keras.distribute import TrainingGPT
from gpt_keras.tokenizers import CharTokenizer
from gpt_keras.training import build_optimizer, create_run, load_model, train
from tests.numpy_reference import randomize_weights
from tests.test_training import read_metrics

# GPT-2's architecture (learned positions, tied embeddings) so that `convert --to hf` applies.
BASE = GPTConfig.from_preset("tiny", position_embedding="learned", dropout=0.1)
EPSILON = float(np.finfo(np.float32).eps)


def adapter_parameters(config, rank, groups):
    """Closed form: r·(D_in + D_out) per adapted `Dense`, per block."""
    d, m = config.hidden_dim, config.mlp_dim or 4 * config.hidden_dim
    shapes = {"attention": [(d, 3 * d), (d, d)], "mlp": [(d, m), (m, d)]}
    return config.num_layers * sum(rank * (i + o) for g in groups for i, o in shapes[g])


def built(config=BASE, cls=GPT, seed=1):
    model = cls(**dataclasses.asdict(config))
    model.build()
    randomize_weights(model, seed=seed)
    return model


def with_random_adapters(model, seed=2):
    """B is zero after `enable` (the adapted model starts as the base): give it values."""
    rng = np.random.default_rng(seed)
    for layer in lora.adapted_layers(model):
        layer.lora_kernel_b.assign(rng.normal(0.0, 0.2, layer.lora_kernel_b.shape))
    return model


def merge_tolerance(model, tokens):
    """Float32 rounding of the merged kernel (one rounding of `W + s·A·B` per element, summed
    over `D_in` terms of activations that LayerNorm keeps of order 1, through the blocks), as a
    bound on the logits: 16·eps·max|logit| covers it with margin for this tiny model."""
    return 16 * EPSILON * float(np.max(np.abs(model(tokens))))


TOKENS = np.random.default_rng(0).integers(0, BASE.vocab_size, (2, BASE.context_length))


@pytest.mark.parametrize("targets", ["attention", "attention,mlp", "mlp"])
def test_only_adapters_are_trainable_counted_in_closed_form(targets):
    model = built()
    frozen_before = [w.numpy().copy() for w in model.weights]
    layers = lora.enable(model, 3, targets=targets)
    groups = targets.split(",")
    assert len(layers) == BASE.num_layers * 2 * len(groups)
    assert sum(int(np.prod(w.shape)) for w in model.trainable_weights) == adapter_parameters(
        BASE, 3, groups)
    assert {id(w) for w in model.trainable_weights} == {
        id(v) for v in lora.adapter_variables(model)}
    # B starts at zero: the adapted model is the base model.
    base = built()
    np.testing.assert_array_equal(np.asarray(model(TOKENS)), np.asarray(base(TOKENS)))
    assert [w.numpy().tolist() for w in lora.frozen_weights(model)] == [
        w.tolist() for w in frozen_before]


def test_training_steps_change_the_adapters_only():
    """Two AdamW steps (weight decay on) on random tokens: every base weight is bit-identical
    afterwards, every adapter matrix has moved. (XLA: see the runs below.)"""
    model = built(cls=TrainingGPT)
    lora.enable(model, 2, alpha=4, targets="attention,mlp")
    assert {layer.lora_alpha for layer in lora.adapted_layers(model)} == {4}
    base = [w.numpy().copy() for w in lora.frozen_weights(model)]
    adapters = [v.numpy().copy() for v in lora.adapter_variables(model)]
    config = TrainConfig(learning_rate=1e-2, warmup_steps=0, max_steps=3)
    model.compile(optimizer=build_optimizer(model, config), jit_compile=False)
    tokens = np.random.default_rng(1).integers(0, BASE.vocab_size, (4, 2, BASE.context_length))
    model.fit(tokens.astype("int32"), epochs=1, batch_size=2, verbose=0)
    assert int(model.optimizer.iterations.numpy()) == 2
    for before, after in zip(base, lora.frozen_weights(model)):
        np.testing.assert_array_equal(before, after.numpy())
    for before, after in zip(adapters, lora.adapter_variables(model)):
        assert not np.array_equal(before, after.numpy()), after.path


def test_merged_model_gives_the_adapted_logits_and_has_no_adapters():
    model = built()
    lora.enable(model, 4, alpha=8, targets="attention,mlp")
    with_random_adapters(model)
    merged = lora.merge(model)
    assert len(merged.weights) == len(built().weights) and not lora.adapted_layers(merged)
    adapted = np.asarray(model(TOKENS))
    assert np.max(np.abs(adapted - np.asarray(built()(TOKENS)))) > 0.1  # the adapters matter
    np.testing.assert_allclose(np.asarray(merged(TOKENS)), adapted, rtol=0,
                               atol=merge_tolerance(model, TOKENS))
    # The merged kernel is W + (alpha/r)·A·B, computed here in float64.
    layer = lora.adapted_layers(model)[0]
    kernel = next(w for w in layer.weights if w.name == "kernel").numpy().astype(np.float64)
    expected = kernel + 2.0 * layer.lora_kernel_a.numpy() @ layer.lora_kernel_b.numpy()
    np.testing.assert_allclose(merged.blocks[0].attention.query_key_value.kernel.numpy(),
                               expected, rtol=0, atol=4 * EPSILON * np.max(np.abs(expected)))


@pytest.mark.parametrize("call, message", [
    (lambda m: lora.enable(m, 0), "LoRA rank must be a positive integer. Received: rank=0"),
    (lambda m: lora.enable(m, 2, alpha=-1), "LoRA alpha must be a positive number"),
    (lambda m: lora.enable(m, 2, targets="attn"),
     "lora_targets must be a comma-separated choice of attention, mlp. Received: "
     "lora_targets='attn'"),
    (lambda m: lora.enable(m, 2, targets=""), "Received: lora_targets=''"),
    (lambda m: (lora.enable(m, 2), lora.enable(m, 2)), "LoRA is already enabled on this model"),
    (lambda m: TrainConfig(lora_rank=-1), "lora_rank must be an integer >= 0. Received: "
     "lora_rank=-1"),
    (lambda m: TrainConfig(lora_rank=2, lora_alpha=0), "lora_alpha must be a positive integer"),
    (lambda m: TrainConfig(lora_targets="attention,head"), "Received: lora_targets="),
])
def test_bad_settings_are_clear_value_errors(call, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace("[", r"\[")):
        call(built())


@pytest.fixture(scope="module")
def base_run(corpus, tmp_path_factory):
    """A run directory holding a random tiny GPT-2-shaped model (the `--init-from` base)."""
    with open(corpus, encoding="utf-8") as f:
        tokenizer = CharTokenizer.train(f.read())
    model = built(BASE.replace(vocab_size=tokenizer.vocab_size))
    return create_run(str(tmp_path_factory.mktemp("runs") / "base"), model, tokenizer,
                      {"test": "random weights"})


LORA = TrainConfig(batch_size=4, max_steps=10, learning_rate=1e-2, warmup_steps=2,
                   decay_steps=10, checkpoint_every=5, eval_every=5, eval_batches=1,
                   sample_every=0, log_every=5, lora_rank=2, lora_alpha=4,
                   lora_targets="attention,mlp", xla="on")


@pytest.fixture(scope="module")
def lora_run(corpus, base_run, tmp_path_factory):
    run_dir = str(tmp_path_factory.mktemp("runs") / "lora")
    train(run_dir, [corpus], BASE, LORA, verbose=False, init_from=base_run)
    return run_dir


def unmerged(run_dir, base_run, checkpoint=None):
    """The run's model as it trained: the base with adapters from a checkpoint (default: the
    newest), not merged."""
    model = load_model(base_run)
    lora.enable(model, LORA.lora_rank, LORA.lora_alpha, LORA.lora_targets)
    directory = os.path.join(run_dir, "checkpoints")
    checkpoints.load(checkpoint or checkpoints.step_checkpoints(directory)[LORA.max_steps], model)
    return model


def test_lora_run_checkpoints_adapters_and_saves_the_merged_model(lora_run, base_run):
    model = unmerged(lora_run, base_run)
    path = checkpoints.step_checkpoints(os.path.join(lora_run, "checkpoints"))[LORA.max_steps]
    with np.load(path) as saved:
        sizes = {key: saved[key].size for key in saved.files if key.startswith("model/")}
    seed_states = [v for v in model.variables if v.path.endswith("seed_generator_state")]
    assert len(sizes) == len(lora.adapter_variables(model)) + len(seed_states)
    assert sum(sizes.values()) == adapter_parameters(BASE, 2, ["attention", "mlp"]) + sum(
        int(np.prod(v.shape)) for v in seed_states)  # no base weight
    # model.keras (what generate, evaluate, export, convert and TFLite read) is the merged model.
    final = load_model(lora_run)
    assert not lora.adapted_layers(final)
    tokens = TOKENS % final.config.vocab_size
    np.testing.assert_allclose(np.asarray(final(tokens)), np.asarray(model(tokens)), rtol=0,
                               atol=merge_tolerance(model, tokens))
    # The adapters trained: the model is no longer the base.
    assert np.max(np.abs(np.asarray(final(tokens)) - np.asarray(load_model(base_run)(tokens)))) > 0
    with open(os.path.join(lora_run, "run.json"), encoding="utf-8") as f:
        settings = json.load(f)
    assert settings["train"]["lora_rank"] == 2 and settings["source"]["init_from"] == base_run


def test_unfinished_lora_run_loads_merged_from_its_checkpoint(lora_run, base_run, tmp_path):
    """Without model.keras (training still running), `load_model` merges the newest
    checkpoint's adapters into the --init-from base."""
    copy = tmp_path / "copy"
    os.makedirs(copy / "checkpoints")
    for name in ("run.json", "tokenizer"):
        os.symlink(os.path.join(lora_run, name), copy / name)
    step_5 = checkpoints.step_path(os.path.join(lora_run, "checkpoints"), 5)
    os.symlink(step_5, copy / "checkpoints" / os.path.basename(step_5))
    model = unmerged(lora_run, base_run, step_5)
    tokens = TOKENS % model.config.vocab_size
    np.testing.assert_allclose(np.asarray(load_model(str(copy))(tokens)),
                               np.asarray(model(tokens)), rtol=0,
                               atol=merge_tolerance(model, tokens))


@pytest.mark.slow
def test_stopped_lora_run_resumes_on_the_same_trajectory(corpus, base_run, lora_run, tmp_path):
    """5 steps, then the same run to 10 from its step-5 checkpoint (adapters, optimizer state,
    dropout RNG restored; the base re-read from --init-from): the losses and final weights of
    the uninterrupted run."""
    resumed = str(tmp_path / "resumed")
    train(resumed, [corpus], BASE, dataclasses.replace(LORA, max_steps=5), verbose=False,
          init_from=base_run)
    train(resumed, [corpus], BASE, LORA, verbose=False, init_from=base_run)
    expected, got = read_metrics(lora_run), read_metrics(resumed)
    assert [row["step"] for row in got] == ["5", "10"]
    for a, b in zip(expected, got):
        for key in ("loss", "val_loss", "learning_rate"):
            assert float(a[key]) == pytest.approx(float(b[key]), rel=1e-6), (a["step"], key)
    for a, b in zip(load_model(lora_run).weights, load_model(resumed).weights):
        np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=1e-6, atol=1e-7)


def test_hf_conversion_of_a_lora_run_gives_the_unmerged_logits(lora_run, base_run, tmp_path,
                                                               capsys):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    main(["convert", lora_run, str(tmp_path / "hf"), "--to", "hf"])
    hf = transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "hf").eval()
    model = unmerged(lora_run, base_run)
    tokens = TOKENS % model.config.vocab_size
    with torch.no_grad():
        logits = hf(torch.tensor(tokens)).logits.numpy()
    # PyTorch's kernels sum in other orders: float32 rounding of each layer's sums, as above.
    np.testing.assert_allclose(logits, np.asarray(model(tokens)), rtol=0,
                               atol=merge_tolerance(model, tokens))


def test_lora_without_init_from_is_a_one_line_cli_error(corpus, tmp_path, capsys):
    run_dir = str(tmp_path / "run")
    with pytest.raises(SystemExit) as exit_info:
        main(["train", "--data", corpus, "--run-dir", run_dir, "--lora-rank", "4"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("gpt-keras: error: --lora-rank adapts a trained model: pass "
                          "--init-from") and err.count("\n") == 1
    assert not os.path.exists(run_dir)
    with pytest.raises(SystemExit):
        main(["train", "--data", corpus, "--run-dir", run_dir, "--lora-targets", "head"])
    assert "--lora-targets must be a comma-separated choice of attention, mlp" in (
        capsys.readouterr().err)
    assert not glob.glob(os.path.join(run_dir, "*"))
