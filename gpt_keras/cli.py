"""The `gpt-keras` command line: `gpt-keras train|evaluate|generate|convert|export|serve ...`
(`gpt-keras -h`).

    gpt-keras train --run-dir runs/shakespeare --max-steps 500

Errors in the user's input print one line, `gpt-keras: error: ...` (naming flags, not Python
fields), and exit with status 2; Ctrl-C prints one line and exits with status 130. `-h` and
`--version` answer without importing TensorFlow.
"""

import argparse
import dataclasses
import os
import re
import sys
import warnings

from gpt_keras.config import DATA_FORMATS, PAIR_FIELDS, WEIGHT_FORMATS, XLA_SETTINGS

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")  # before TensorFlow loads: keep the CLI quiet

DEFAULT_CORPUS_URL = (
    "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt"
)
DEFAULT_CORPUS_SHA256 = "86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed"
# `../shared/data` beside the checkout this package runs from (`train` prints the path it uses).
SHARED_CORPUS = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data",
                             "tinyshakespeare.txt")

EXAMPLES = """examples:
  gpt-keras train --run-dir runs/shakespeare --max-steps 500   # Tiny Shakespeare, resumable
  gpt-keras train --run-dir runs/shakespeare --max-steps 1000  # the same run, trained further
  gpt-keras train --data notes/ --tokenizer bpe --run-dir runs/notes
  gpt-keras evaluate runs/shakespeare                          # on the run's validation split
  gpt-keras train --format prompt-completion --data pairs.jsonl --run-dir runs/sft
  gpt-keras generate runs/shakespeare --prompt "ROMEO:" --max-new-tokens 200
  gpt-keras export runs/shakespeare --out models/shakespeare   # TF Serving SavedModel
  gpt-keras export runs/shakespeare --format tflite --out exports/shakespeare
  gpt-keras serve models/shakespeare

`gpt-keras COMMAND -h` lists the options of a command."""

# Help of the `TrainConfig` fields, which become `gpt-keras train` flags of the same names.
TRAIN_HELP = {
    "batch_size": "sequences per optimizer update, over all replicas",
    "max_steps": "optimizer updates to train to; a resumed run may raise it to train further",
    "learning_rate": "peak learning rate, reached after the warmup",
    "min_learning_rate": "learning rate at the end of the cosine decay, kept after it",
    "warmup_steps": "updates of linear warmup from 0",
    "decay_steps": "updates until the cosine decay reaches --min-learning-rate (nanoGPT's "
                   "lr_decay_iters; default: --max-steps of the run's first start)",
    "weight_decay": "AdamW weight decay (weight matrices only)",
    "beta_1": "AdamW beta_1",
    "beta_2": "AdamW beta_2",
    "clip_norm": "global gradient-norm clipping (0: off)",
    "gradient_accumulation_steps": "micro-batches of --batch-size per update",
    "mixed_precision": "compute in float16 or bfloat16 (default: float32)",
    "seed": "seed of the initialisation, data order and dropout",
    "log_every": "steps between training-loss rows of metrics.csv and loss.png",
    "eval_every": "steps between validations (also at the last step)",
    "eval_batches": "fixed validation batches per validation",
    "checkpoint_every": "steps between checkpoints (also at the last step)",
    "keep_checkpoints": "newest step checkpoints kept (plus the best one)",
    "sample_every": "steps between printed text samples (also at the last step; 0: never)",
    "sample_tokens": "tokens per printed sample",
    "freeze_blocks": "fine-tuning: keep the first K transformer blocks fixed",
    "xla": "compile the training step with XLA (auto: yes, except bfloat16 without a GPU)",
    "lora_rank": "fine-tuning with --init-from: train rank-R LoRA adapters only (0: all weights)",
    "lora_alpha": "LoRA scale alpha/rank (default: alpha = rank)",
    "lora_targets": "layers LoRA adapts: attention, mlp or attention,mlp",
}
MODEL_FLAGS = {
    "context_length": (int, "tokens the model sees at once"),
    "num_layers": (int, "transformer blocks"),
    "num_heads": (int, "attention heads (must divide --hidden-dim)"),
    "hidden_dim": (int, "width of the residual stream"),
    "dropout": (float, "dropout rate in [0, 1)"),
}
# Settings named in library messages whose flag is not `--` + the name with dashes.
MESSAGE_ALIASES = {
    "tokenizer.kind": "--tokenizer", "tokenizer.vocab_size": "--vocab-size",
    "data.train": "--data", "data.validation": "--validation-data",
    "source.init_from": "--init-from", "data.format": "--format",
    "data.fields": "--prompt-field/--completion-field",
}


class ArgumentParser(argparse.ArgumentParser):
    """`argparse.ArgumentParser` whose errors are one line, `gpt-keras: error: ...`, status 2."""

    def error(self, message):
        self.exit(2, f"gpt-keras: error: {message} (see `{self.prog} -h`)\n")


def _number(kind, minimum=None, maximum=None, above=None, text=""):
    """An argparse type: `kind(value)` in [minimum, maximum] and above `above`, else an error
    saying `expected {text}`."""

    def parse(value):
        try:
            number = kind(value)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {text}, received {value!r}") from None
        if ((minimum is not None and number < minimum) or (maximum is not None and number > maximum)
                or (above is not None and number <= above) or number != number):  # NaN
            raise argparse.ArgumentTypeError(f"expected {text}, received {value}")
        return number

    parse.__name__ = text  # argparse names the type in some messages
    return parse


POSITIVE_INT = _number(int, minimum=1, text="an integer >= 1")
COUNT = _number(int, minimum=0, text="an integer >= 0")
NON_NEGATIVE = _number(float, minimum=0, text="a number >= 0")
POSITIVE = _number(float, above=0, text="a number > 0")


def default_corpus(cache_dir=None):
    """Tiny Shakespeare: `../shared/data` beside a checkout if present, else downloaded once into
    the Keras cache (`cache_dir`, default `~/.keras`) and checked against its sha256. Raises
    `ValueError` with the cause when it cannot be had (and leaves no empty cache directory)."""
    if os.path.isfile(SHARED_CORPUS):
        return os.path.abspath(SHARED_CORPUS)
    import keras

    cache_dir = os.path.expanduser(cache_dir or os.path.join("~", ".keras"))
    subdir = os.path.join(cache_dir, "gpt_keras")
    existed = os.path.isdir(subdir)
    try:
        path = keras.utils.get_file(
            "tinyshakespeare.txt", DEFAULT_CORPUS_URL, file_hash=DEFAULT_CORPUS_SHA256,
            hash_algorithm="sha256", cache_dir=cache_dir, cache_subdir="gpt_keras",
        )
    except Exception as error:  # no network, proxy, or a corrupted download
        if not existed and os.path.isdir(subdir) and not os.listdir(subdir):
            os.rmdir(subdir)  # leave no empty cache directory behind
        cause = " ".join(str(error).split()) or type(error).__name__
        raise ValueError(
            f"Could not download the default corpus (Tiny Shakespeare) from {DEFAULT_CORPUS_URL}: "
            f"{cause}. Pass --data PATH to train on your own text files."
        ) from None
    return path


def _add_format_arguments(parser, default):
    """`--format` and the field-name flags of prompt-completion pairs (`gpt_keras.sft`)."""
    parser.add_argument("--format", dest="data_format", choices=DATA_FORMATS, default=default,
                        help="text: plain text files; prompt-completion: JSONL pairs, the loss "
                        "on the completion tokens only (default: "
                        + (default or "the run's own") + ")")
    parser.add_argument("--prompt-field", default=None, metavar="NAME",
                        help="JSON field of the prompt (prompt-completion; default prompt)")
    parser.add_argument("--completion-field", default=None, metavar="NAME",
                        help="JSON field of the completion (prompt-completion; default "
                        "completion)")


def _fields(args):
    """`(prompt field, completion field)` from the flags, or None where neither is given."""
    if args.prompt_field is None and args.completion_field is None:
        return None
    if args.data_format == "text":
        raise ValueError("--prompt-field and --completion-field name the fields of "
                         "--format prompt-completion; leave them out for text.")
    return (args.prompt_field or PAIR_FIELDS[0], args.completion_field or PAIR_FIELDS[1])


def _add_train_arguments(parser):
    from gpt_keras.config import (
        FINE_TUNING_LEARNING_RATE, POSITION_EMBEDDINGS, PRESETS, TOKENIZERS, TrainConfig,
    )

    parser.add_argument("--data", nargs="+", metavar="PATH",
                        help="text files, globs or directories (default: Tiny Shakespeare)")
    parser.add_argument("--validation-data", nargs="+", metavar="PATH",
                        help="separate validation text (default: the last 10%% of --data)")
    _add_format_arguments(parser, "text")
    parser.add_argument("--run-dir", required=True, help="where the run lives; re-run the same "
                        "command to resume it")
    parser.add_argument("--preset", default="shakespeare-char", choices=sorted(PRESETS),
                        help="model shape (default shakespeare-char: 4 layers, 4 heads, 128 dims, "
                        "context 64)")
    parser.add_argument("--init-from", metavar="DIR",
                        help="fine-tune: start from this run directory or Hugging Face GPT-2 "
                        "directory (its model and tokenizer replace --preset and --tokenizer)")
    parser.add_argument("--tokenizer", default="char", choices=TOKENIZERS,
                        help="char: one token per character; bpe: byte-level BPE trained on "
                        "--data (default char)")
    parser.add_argument("--vocab-size", type=POSITIVE_INT, default=None,
                        help="BPE vocabulary size (with --tokenizer bpe; default 4096)")
    parser.add_argument("--replicas", type=POSITIVE_INT, default=None,
                        help="MirroredStrategy replicas: GPUs, or logical CPU devices without GPUs")
    for field, (kind, text) in MODEL_FLAGS.items():
        parser.add_argument("--" + field.replace("_", "-"),
                            type=NON_NEGATIVE if kind is float else POSITIVE_INT, default=None,
                            help=f"{text} (default: the preset's)")
    parser.add_argument("--position-embedding", choices=POSITION_EMBEDDINGS, default=None,
                        help="sinusoidal: the Transformer paper's fixed encoding; learned: GPT-2's "
                        "table; rotary: RoPE (default: the preset's)")
    defaults = TrainConfig()
    for field in dataclasses.fields(TrainConfig):
        flag = "--" + field.name.replace("_", "-")
        default = getattr(defaults, field.name)
        if field.name == "mixed_precision":
            parser.add_argument(flag, choices=["float16", "bfloat16"], default=None,
                                help=TRAIN_HELP[field.name])
        elif field.name == "learning_rate":  # resolved in `_train`: depends on --init-from
            parser.add_argument(flag, type=NON_NEGATIVE, default=None, help=(
                f"{TRAIN_HELP[field.name]} (default {default:g}; {FINE_TUNING_LEARNING_RATE:g} "
                "with --init-from)"))
        elif field.name == "xla":
            parser.add_argument(flag, choices=XLA_SETTINGS, default=default,
                                help=f"{TRAIN_HELP[field.name]} (default {default})")
        else:
            kind = POSITIVE_INT if isinstance(default, int) or default is None else NON_NEGATIVE
            if field.name in ("warmup_steps", "sample_every", "sample_tokens", "freeze_blocks",
                              "seed", "lora_rank"):
                kind = COUNT
            if isinstance(default, str):
                kind = str
            suffix = "" if default is None else f" (default {default})"
            parser.add_argument(flag, type=kind, default=default,
                                help=TRAIN_HELP[field.name] + suffix)


def _train(args):
    from gpt_keras import checkpoints
    from gpt_keras.config import FINE_TUNING_LEARNING_RATE, GPTConfig, TrainConfig

    if args.learning_rate is None:
        args.learning_rate = (FINE_TUNING_LEARNING_RATE if args.init_from
                              else TrainConfig.learning_rate)
    overrides = {field: getattr(args, field) for field in (*MODEL_FLAGS, "position_embedding")
                 if getattr(args, field) is not None}
    model_config = GPTConfig.from_preset(args.preset, **overrides)
    train_config = TrainConfig(**{f.name: getattr(args, f.name)
                                  for f in dataclasses.fields(TrainConfig)})
    vocab_size = args.vocab_size
    if args.tokenizer == "bpe" and vocab_size is None:
        vocab_size = 4096
    if args.data_format == "prompt-completion" and not args.data:
        raise ValueError("--format prompt-completion needs --data PAIRS.jsonl (JSON lines with "
                         "prompt and completion fields).")
    _import_tensorflow_quietly()
    from gpt_keras.training import train

    try:
        run = train(
            args.run_dir,
            args.data or [default_corpus()],
            model_config,
            train_config,
            tokenizer=args.tokenizer,
            tokenizer_vocab_size=vocab_size,
            validation_paths=args.validation_data,
            replicas=args.replicas,
            init_from=args.init_from,
            data_format=args.data_format,
            fields=_fields(args) or PAIR_FIELDS,
        )
    except KeyboardInterrupt:
        steps = checkpoints.step_checkpoints(os.path.join(args.run_dir, "checkpoints"))
        if not steps:
            raise _Interrupted("no checkpoint was written yet; re-run the same command to start "
                               "again") from None
        raise _Interrupted(f"re-run the same command to resume from the checkpoint of step "
                           f"{max(steps)}") from None
    print(f"Run directory: {run.directory}")
    print(f"  model: {run.model_path}\n  checkpoints: {run.checkpoint_dir}\n"
          f"  metrics: {run.metrics_path}\n  loss plot: {run.plot_path}\n"
          f"  TensorBoard: tensorboard --logdir {run.tensorboard_dir}")


class _Interrupted(Exception):
    """Ctrl-C, with the one line to print."""


def _evaluate(args):
    _import_tensorflow_quietly()
    from gpt_keras.training import evaluate, read_run_config

    read_run_config(args.run_dir)  # a clear error for a directory that is not a run
    if args.data:
        print(f"Scoring {', '.join(args.data)} (tokenizing first)...", flush=True)
    else:
        print(f"Scoring the validation split of {args.run_dir}...", flush=True)
    result = evaluate(args.run_dir, args.data, batch_size=args.batch_size,
                      progress=_Progress("  batch"), data_format=args.data_format,
                      fields=_fields(args))
    if "exact_match" in result:
        print(f"pairs {result['examples']}  completion tokens {result['completion_tokens']}  "
              f"completion loss {result['completion_loss']:.4f}  exact match "
              f"{result['exact_match']:.4f}")
        return
    print(f"tokens {result['tokens']}  loss {result['val_loss']:.4f}  "
          f"perplexity {result['val_perplexity']:.3f}  "
          f"bits/char {result['val_bits_per_char']:.4f}  "
          f"bits/byte {result['val_bits_per_byte']:.4f}")


class _Progress:
    """`progress(done, total)`: redrawn in place on a terminal, else a line every 10%."""

    def __init__(self, label, stream=None):
        self.label, self.stream, self.shown = label, stream or sys.stdout, -1

    def __call__(self, done, total):
        tenth = 10 * done // total
        if self.stream.isatty():
            end = "\n" if done == total else ""
            print(f"\r{self.label} {done}/{total}", end=end, file=self.stream, flush=True)
        elif tenth > self.shown:
            self.shown = tenth
            print(f"{self.label} {done}/{total}", file=self.stream, flush=True)


def _generate(args):
    _import_tensorflow_quietly()
    from gpt_keras.generation import TextGenerator
    from gpt_keras.precision import with_weights
    from gpt_keras.tokenizers import load_tokenizer
    from gpt_keras.training import load_model, read_run_config

    if args.tflite:
        from gpt_keras.tflite import TFLiteGenerator

        if args.xla != "auto":
            raise ValueError("--xla does not apply to --tflite (the LiteRT interpreter runs the "
                             "file as it is): drop one of them.")
        generator = TFLiteGenerator(args.tflite)
        generator.check_source(args.run_dir)
    else:
        read_run_config(args.run_dir)  # a clear error for a directory that is not a run
        generator = TextGenerator(with_weights(load_model(args.run_dir), args.weights),
                                  load_tokenizer(os.path.join(args.run_dir, "tokenizer")),
                                  jit_compile={"auto": "auto", "on": True, "off": False}[args.xla])
        print("gpt-keras: compiling the decoding loop for this shape (first call only)...",
              file=sys.stderr, flush=True)
    prompt = sys.stdin.read() if args.prompt == "-" else args.prompt
    knobs = dict(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, seed=args.seed,
                 repetition_penalty=args.repetition_penalty, min_new_tokens=args.min_new_tokens,
                 stop_strings=args.stop, banned_token_ids=args.ban)
    for index in range(args.num_samples):
        if args.num_samples > 1:
            print(f"--- sample {index + 1} ---", flush=True)
        seeded = dict(knobs, seed=None if args.seed is None else args.seed + index)
        if args.stream and not args.logprobs:
            pieces = generator.stream(prompt, args.max_new_tokens, **seeded)  # checks first
            print(prompt, end="", flush=True)
            for piece in pieces:
                print(piece, end="", flush=True)
            print()
        elif args.logprobs:
            completion = generator.generate(prompt, args.max_new_tokens,
                                            return_logprobs=True, **seeded)
            print(prompt + completion.text, flush=True)
            for token, logprob in zip(completion.token_ids, completion.logprobs):
                piece = generator.tokenizer.detokenize([token]).numpy()
                print(f"{token}\t{logprob:.4f}\t{piece.decode('utf-8', 'replace')!r}",
                      file=sys.stderr)
        else:
            print(prompt + generator.generate(prompt, args.max_new_tokens, **seeded))


def _attention(args):
    _import_tensorflow_quietly()
    from gpt_keras.attention import attention_maps, write_attention_report
    from gpt_keras.tokenizers import load_tokenizer
    from gpt_keras.training import load_model

    model = load_model(args.run_dir)
    config = model.config
    for name, value, limit in (("--layer", args.layer, config.num_layers),
                               ("--head", args.head, config.num_heads)):
        if value >= limit:
            raise ValueError(f"{name} must be below {limit} (the model's {name[2:]}s: 0 to "
                             f"{limit - 1}). Received: {value}")
    maps = attention_maps(model, load_tokenizer(os.path.join(args.run_dir, "tokenizer")),
                          args.prompt)
    for path in write_attention_report(maps, args.out, args.layer, args.head):
        print(path)


def _note(message, category, filename, lineno, file=None, line=None):
    """`warnings.showwarning` for the CLI: `gpt-keras: note: MESSAGE` on stderr, no source path."""
    print(f"gpt-keras: note: {message}", file=sys.stderr, flush=True)


def _convert(args):
    import json

    _import_tensorflow_quietly()
    from gpt_keras.checkpoints import atomic_write
    from gpt_keras.hf import load_gpt2, save_gpt2
    from gpt_keras.keras_hub_import import KERAS_HUB, load_keras_hub_gpt2, source_format
    from gpt_keras.tokenizers import GPT2Tokenizer, load_tokenizer
    from gpt_keras.training import create_run, load_model

    if args.to == "gpt_keras":
        kind = args.source_format or source_format(args.source)
        if kind == KERAS_HUB:
            model, tokenizer = load_keras_hub_gpt2(args.source)
            if args.vocab:
                tokenizer = GPT2Tokenizer.from_directory(args.vocab)
            elif tokenizer is None:
                raise ValueError(f"{args.source} holds no tokenizer (a GPT2Backbone saves none): "
                                 "pass --vocab DIR with the encoder.json + vocab.bpe it was "
                                 "trained with.")
        else:
            model = load_gpt2(args.source)
            tokenizer = GPT2Tokenizer.from_directory(args.vocab or args.source)
        if tokenizer.vocab_size > model.config.vocab_size:
            raise ValueError(
                f"The tokenizer has {tokenizer.vocab_size} tokens but the checkpoint's vocabulary "
                f"has {model.config.vocab_size}; pass the --vocab files of this checkpoint."
            )
        create_run(args.destination, model, tokenizer,
                   {kind.replace("-", "_"): os.path.abspath(args.source)})
        print(f"Run directory {args.destination}: try `gpt-keras generate {args.destination} "
              "--prompt TEXT`.")
        return
    if args.source_format:
        raise ValueError("--from names the kind of a source converted to gpt_keras; with --to hf "
                         "the source is a run directory.")
    tokenizer = load_tokenizer(os.path.join(args.source, "tokenizer"))
    directory = save_gpt2(load_model(args.source), args.destination,
                          end_of_text_id=tokenizer.end_of_text_id)
    if isinstance(tokenizer, GPT2Tokenizer):  # Hugging Face's file names, for GPT2TokenizerFast
        vocabulary = json.dumps(tokenizer.vocabulary, ensure_ascii=False).encode("utf-8")
        merges = "#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in tokenizer.merges)
        atomic_write(os.path.join(directory, "vocab.json"), lambda f: f.write(vocabulary))
        atomic_write(os.path.join(directory, "merges.txt"),
                     lambda f: f.write(merges.encode("utf-8")))
    print(f"Hugging Face checkpoint written to {directory}.")


def _export(args):
    _import_tensorflow_quietly()
    if args.format == "tflite":
        if args.version is not None:
            raise ValueError("--version numbers TF Serving's SavedModel versions; it does not "
                             "apply to --format tflite.")
        import json

        from gpt_keras.tflite import MANIFEST_FILE, export_tflite

        print("Converting to TFLite and checking the file in the LiteRT interpreter...",
              flush=True)
        path = export_tflite(args.run_dir, args.out, quantize=args.quantize, force=args.force,
                             weights=args.weights)
        with open(os.path.join(os.path.dirname(path), MANIFEST_FILE), encoding="utf-8") as f:
            signatures = json.load(f)["signatures"]
        print(f"TFLite model written to {path}. Signatures:")
    else:
        if args.quantize is not None:
            raise ValueError("--quantize applies to --format tflite; the SavedModel is float32.")
        from gpt_keras.serving import export_saved_model, read_manifest

        print("Writing the SavedModel and checking it as TF Serving loads it...", flush=True)
        path = export_saved_model(args.run_dir, args.out, version=args.version, force=args.force,
                                  weights=args.weights)
        signatures = read_manifest(path)["signatures"]
        print(f"SavedModel written to {path} (verified as TF Serving loads it). Signatures:")
    for name, contract in signatures.items():
        inputs, outputs = (
            ", ".join(f"{key} {spec['dtype']}[{', '.join(_dimension(n) for n in spec['shape'])}]"
                      for key, spec in contract[side].items())
            for side in ("inputs", "outputs")
        )
        print(f"  {name}({inputs}) -> {outputs}")


def _dimension(size):
    return "?" if size is None or size < 0 else str(size)  # None/-1: any size


def _serve(args):
    _import_tensorflow_quietly()
    from gpt_keras.server import Limits, serve

    limits = Limits(**{field.name: getattr(args, field.name)
                       for field in dataclasses.fields(Limits)})
    serve(args.base_dir, host=args.host, port=args.port, quiet=args.quiet,
          model_name=args.model_name, poll_seconds=args.poll_seconds,
          num_versions=args.num_versions, limits=limits,
          workers=args.workers, enable_batching=args.enable_batching,
          batching_parameters_file=args.batching_parameters_file)


def _add_serve_arguments(parser):
    parser.add_argument("base_dir", metavar="MODELS/NAME",
                        help="directory of numeric SavedModel versions (`export --out`)")
    parser.add_argument("--host", default="127.0.0.1",
                        help="address to listen on (default 127.0.0.1: this machine only)")
    parser.add_argument("--port", type=int, default=8501, help="(default 8501; 0: a free port)")
    parser.add_argument("--model-name", help="name in the URLs (default: the directory's name)")
    parser.add_argument("--poll-seconds", type=float, default=2.0,
                        help="seconds between checks for new versions (default 2; 0: never)")
    parser.add_argument("--num-versions", type=int, default=1,
                        help="how many of the highest versions to keep loaded (default 1)")
    # The bounds of gpt_keras.server.Limits (defaults equal, as tests/test_server.py checks).
    parser.add_argument("--max-request-bytes", type=int, default=4 * 1024 * 1024,
                        help="larger request bodies get HTTP 413 (default 4 MiB)")
    parser.add_argument("--max-rows", type=int, default=64, help="rows per request (default 64)")
    parser.add_argument("--max-new-tokens", type=int, default=1024,
                        help="value of a `max_new_tokens` input (default 1024)")
    parser.add_argument("--max-tokens", type=int, default=16384,
                        help="rows × (positions + new tokens) per request (default 16384)")
    parser.add_argument("--max-response-bytes", type=int, default=64 * 1024 * 1024,
                        help="answer size, bounded before running (default 64 MiB)")
    parser.add_argument("--idle-timeout", type=float, default=30.0,
                        help="seconds a connection may wait without a complete request head "
                             "(idle keep-alive, slow headers; default 30)")
    parser.add_argument("--read-timeout", type=float, default=30.0,
                        help="seconds to receive a request body, else HTTP 408 (default 30)")
    parser.add_argument("--max-connections", type=int, default=256,
                        help="open connections; more get HTTP 503 (default 256)")
    parser.add_argument("--workers", type=int, default=8,
                        help="threads running predictions concurrently (default 8)")
    parser.add_argument("--quiet", action="store_true", help="no log line per request")
    parser.add_argument("--enable-batching", action="store_true",
                        help="batch concurrent requests as TF Serving's --enable_batching")
    parser.add_argument("--batching-parameters-file", metavar="FILE",
                        help="BatchingParameters text proto (e.g. export/batching_parameters.txt)")


def build_parser():
    from gpt_keras import __version__

    parser = ArgumentParser(
        prog="gpt-keras", description="Train, evaluate and use GPT models built with Keras.",
        epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"gpt-keras {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    train_parser = commands.add_parser(
        "train", help="train (or resume, or train further) a model on text files",
        description="Train a GPT on text files. Re-run the same command to resume after an "
        "interruption, or with a larger --max-steps to train further; the cadence options "
        "(--eval-every, --checkpoint-every, --sample-every, --log-every, --keep-checkpoints) "
        "may change on resume, the others may not. The last step always validates and writes "
        "a checkpoint.",
        epilog="example: gpt-keras train --run-dir runs/shakespeare --max-steps 500",
    )
    _add_train_arguments(train_parser)
    train_parser.set_defaults(handler=_train, command_parser=train_parser)
    evaluate_parser = commands.add_parser(
        "evaluate", help="loss, perplexity and bits per char of a run",
        description="Score a run on its own validation split, or on --data.",
        epilog="example: gpt-keras evaluate runs/shakespeare",
    )
    evaluate_parser.add_argument("run_dir", metavar="RUN_DIR", help="a run directory")
    evaluate_parser.add_argument("--data", nargs="+", metavar="PATH",
                                 help="text (or JSONL pairs) to score (default: the run's "
                                 "validation split)")
    _add_format_arguments(evaluate_parser, None)
    evaluate_parser.add_argument("--batch-size", type=POSITIVE_INT, default=32,
                                 help="windows scored at once (default 32)")
    evaluate_parser.set_defaults(handler=_evaluate, command_parser=evaluate_parser)
    generate_parser = commands.add_parser(
        "generate", help="sample text from a trained run (streams tokens as they are decoded)",
        epilog='example: gpt-keras generate runs/shakespeare --prompt "ROMEO:" --top-k 200',
    )
    generate_parser.add_argument("run_dir", metavar="RUN_DIR",
                                 help="a run directory, or with --tflite the export directory")
    generate_parser.add_argument("--tflite", metavar="FILE",
                                 help="generate with this .tflite file (`export --format tflite`) "
                                 "through the LiteRT interpreter; RUN_DIR must be its directory "
                                 "or the run it was exported from")
    generate_parser.add_argument("--prompt", default="", help="text to continue; '-' reads stdin "
                                 "(default: empty, i.e. unconditional)")
    generate_parser.add_argument("--max-new-tokens", type=COUNT, default=200,
                                 help="tokens to generate (default 200)")
    generate_parser.add_argument("--temperature", type=NON_NEGATIVE, default=0.8,
                                 help="sampling temperature; 0 for greedy decoding (default 0.8)")
    generate_parser.add_argument("--top-k", type=COUNT, default=None,
                                 help="sample among the K most likely tokens (default or 0: all)")
    generate_parser.add_argument("--top-p", default=None,
                                 type=_number(float, above=0, maximum=1,
                                              text="a number in (0, 1]"),
                                 help="sample among the most likely tokens whose probabilities "
                                 "add up to P (nucleus sampling; default: all)")
    generate_parser.add_argument("--seed", type=COUNT, default=None,
                                 help="seed for reproducible samples (default: random)")
    generate_parser.add_argument("--num-samples", type=POSITIVE_INT, default=1,
                                 help="samples to print (seeds --seed, --seed + 1, ...)")
    generate_parser.add_argument("--stream", action=argparse.BooleanOptionalAction, default=True,
                                 help="print tokens as they are produced (default)")
    generate_parser.add_argument("--repetition-penalty", default=1.0,
                                 type=_number(float, above=0, text="a number > 0"),
                                 help="divide the logits of tokens already in the text by P "
                                 "(Hugging Face's; 1: off, 1.1-1.3 against loops)")
    generate_parser.add_argument("--min-new-tokens", type=COUNT, default=0,
                                 help="no end of text before N new tokens")
    generate_parser.add_argument("--stop", action="append", default=[], metavar="TEXT",
                                 help="end the text before TEXT (repeat for several)")
    generate_parser.add_argument("--ban", action="append", default=[], type=COUNT, metavar="ID",
                                 help="never generate token ID (repeat for several)")
    generate_parser.add_argument("--logprobs", action="store_true",
                                 help="after each sample, print its tokens and their "
                                 "log-probabilities to stderr")
    generate_parser.add_argument("--weights", choices=WEIGHT_FORMATS, default="float32",
                                 help="decode with the weights in this format (bfloat16: half "
                                 "the bytes; int8: weight-only int8, a quarter)")
    generate_parser.add_argument(
        "--xla", choices=XLA_SETTINGS, default="auto",
        help="compile the decoding loop with XLA (auto: as `generation.generate` chooses, XLA for "
        "float32; off starts sooner, as nothing is compiled: for short texts from small models)")
    generate_parser.set_defaults(handler=_generate, command_parser=generate_parser)
    attention_parser = commands.add_parser(
        "attention", help="heat maps and an interactive page of what each token attends to",
        epilog="example: gpt-keras attention runs/shakespeare --prompt 'To be, or not to be' "
        "--out attention/",
    )
    attention_parser.add_argument("run_dir", metavar="RUN_DIR", help="a run directory")
    attention_parser.add_argument("--prompt", required=True, help="the text to look at")
    attention_parser.add_argument("--out", required=True, metavar="DIR",
                                  help="where to write attention-grid.png, attention-L*-H*.png "
                                  "and attention.html")
    attention_parser.add_argument("--layer", type=COUNT, default=0,
                                  help="the layer drawn at full size (default 0)")
    attention_parser.add_argument("--head", type=COUNT, default=0,
                                  help="the head drawn at full size (default 0)")
    attention_parser.set_defaults(handler=_attention, command_parser=attention_parser)
    convert_parser = commands.add_parser(
        "convert", help="Hugging Face or keras-hub GPT-2 -> run directory, or back (--to hf)",
        epilog="examples: gpt-keras convert hf/gpt2 runs/gpt2; "
        "gpt-keras convert my_gpt2_preset runs/mine (keras-hub save_to_preset or .keras)",
    )
    convert_parser.add_argument("source", help="HF_DIR, a keras-hub preset directory or .keras "
                                "file (default), or RUN_DIR (with --to hf)")
    convert_parser.add_argument("--from", dest="source_format",
                                choices=["huggingface", "keras-hub"], default=None,
                                help="what SOURCE is (default: told from its files)")
    convert_parser.add_argument("destination", help="RUN_DIR (default) or HF_DIR (with --to hf)")
    convert_parser.add_argument("--to", choices=["gpt_keras", "hf"], default="gpt_keras",
                                help="direction of the conversion (default gpt_keras)")
    convert_parser.add_argument("--vocab", help="directory with encoder.json + vocab.bpe (or "
                                "vocab.json + merges.txt) when SOURCE has none (a keras-hub "
                                "GPT2Backbone never has)")
    convert_parser.set_defaults(handler=_convert, command_parser=convert_parser)
    export_parser = commands.add_parser(
        "export", help="a run -> a verified TF Serving SavedModel version (or TFLite)",
        epilog="example: gpt-keras export runs/shakespeare --out models/shakespeare",
    )
    export_parser.add_argument("run_dir", metavar="RUN_DIR",
                               help="a run directory (`train` or `convert`)")
    export_parser.add_argument("--out", required=True, metavar="DIR",
                               help="SavedModel: the model's base path, versions go in numbered "
                               "directories under it; TFLite: the directory for the file")
    export_parser.add_argument("--version", type=POSITIVE_INT, default=None,
                               help="version number (default: the next free one, 1 if none)")
    export_parser.add_argument("--force", action="store_true",
                               help="replace an existing version (or TFLite export) of the same "
                               "format")
    export_parser.add_argument("--format", choices=["saved_model", "tflite"],
                               default="saved_model", help="(default saved_model)")
    export_parser.add_argument("--quantize", choices=["float16", "int8"], default=None,
                               help="TFLite's own weight quantization (with --format tflite)")
    export_parser.add_argument("--weights", choices=WEIGHT_FORMATS, default="float32",
                               help="export the weights in this format (gpt_keras.precision; "
                               "TFLite: float32 or int8)")
    export_parser.set_defaults(handler=_export, command_parser=export_parser)
    serve_parser = commands.add_parser(
        "serve", help="a development server speaking TF Serving's REST API over exported versions",
        epilog="example: gpt-keras serve models/shakespeare --port 8501",
    )
    _add_serve_arguments(serve_parser)
    serve_parser.set_defaults(handler=_serve, command_parser=serve_parser)
    return parser


def _import_tensorflow_quietly():
    """Imports TensorFlow with file descriptor 2 sent to /dev/null: TF 2.21 writes absl/oneDNN/
    CUDA lines (`I0000 ... port.cc`, "All log messages before absl::InitializeLog()") while
    loading, whatever TF_CPP_MIN_LOG_LEVEL says. An import error is raised as usual."""
    if "tensorflow" in sys.modules:
        return
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 2)
            import tensorflow  # noqa: F401
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def flag_names(message, parser):
    """`message` with the Python names of settings that are flags of `parser` written as those
    flags: `max_steps` → `--max-steps`, `Received: top_k=0` → `Received: --top-k 0`."""
    flags = dict(MESSAGE_ALIASES)
    for action in parser._actions:
        long = [option for option in action.option_strings if option.startswith("--")]
        if long:
            flags[action.dest] = long[0]
    for section in ("model", "train"):
        flags.update({f"{section}.{dest}": flag for dest, flag in list(flags.items())
                      if "." not in dest})

    def replace(match):
        quoted, name, assigned = match.group(1), match.group(2), match.group(3)
        # A plain word (e.g. "the dropout") stays; an identifier (`dropout`, top_k, seed=) goes.
        if name not in flags or not (quoted or assigned or "_" in name or "." in name):
            return match.group(0)
        return flags[name] + (" " if assigned else "")

    # `force=True`-style advice to Python callers stays as it is.
    return re.sub(r"(?<![\w/-])(`?)([a-z][a-z0-9_.]*[a-z0-9])`?(=(?!True|False|None))?",
                  replace, message)


def main(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("always", UserWarning)
            warnings.showwarning = _note  # e.g. a damaged checkpoint skipped: one clean line
            args.handler(args)
    except (ValueError, FloatingPointError) as error:
        parser.exit(2, f"gpt-keras: error: {flag_names(str(error), args.command_parser)}\n")
    except (KeyboardInterrupt, _Interrupted) as interrupt:
        if sys.stdout.isatty():
            print(flush=True)  # end a progress line drawn in place
        detail = f"; {interrupt}" if isinstance(interrupt, _Interrupted) else ""
        parser.exit(130, f"gpt-keras: interrupted{detail}.\n")


if __name__ == "__main__":
    sys.exit(main())
