"""The `gpt-keras` command line: `gpt-keras train|evaluate|generate|convert|export|serve ...`
(`gpt-keras -h`).

Errors in the user's input print one line, `gpt-keras: error: ...`, and exit with status 2.
"""

import argparse
import dataclasses
import os
import sys

from gpt_keras.config import WEIGHT_FORMATS

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")  # before TensorFlow loads: keep the CLI quiet

DEFAULT_CORPUS_URL = (
    "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt"
)
DEFAULT_CORPUS_SHA256 = "86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed"


def default_corpus():
    """Tiny Shakespeare: `../shared/data` beside a checkout if present, else downloaded once into
    the Keras cache and checked against its sha256. Raises `ValueError` when it cannot be had."""
    import keras

    shared = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data",
                          "tinyshakespeare.txt")
    if os.path.isfile(shared):
        return os.path.abspath(shared)
    try:
        return keras.utils.get_file(
            "tinyshakespeare.txt", DEFAULT_CORPUS_URL, file_hash=DEFAULT_CORPUS_SHA256,
            hash_algorithm="sha256", cache_subdir="gpt_keras",
        )
    except Exception as error:  # no network, proxy, or a corrupted download
        raise ValueError(
            f"Could not download the default corpus (Tiny Shakespeare) from {DEFAULT_CORPUS_URL}: "
            f"{type(error).__name__}. Pass --data PATH to train on your own text files."
        ) from None


def _add_train_arguments(parser):
    from gpt_keras.config import PRESETS
    from gpt_keras.training import TOKENIZERS, TrainConfig

    defaults = TrainConfig()
    parser.add_argument("--data", nargs="+", help="text files, globs or directories "
                        "(default: Tiny Shakespeare)")
    parser.add_argument("--validation-data", nargs="+",
                        help="separate validation text (default: the last 10%% of --data)")
    parser.add_argument("--run-dir", required=True, help="where the run lives; re-run the same "
                        "command to resume it")
    parser.add_argument("--preset", default="shakespeare-char", choices=sorted(PRESETS))
    parser.add_argument("--init-from", help="fine-tune: start from this run directory or Hugging "
                        "Face GPT-2 directory (its model and tokenizer replace --preset and "
                        "--tokenizer)")
    parser.add_argument("--tokenizer", default="char", choices=TOKENIZERS)
    parser.add_argument("--vocab-size", type=int, default=None,
                        help="BPE vocabulary size (with --tokenizer bpe; default 4096)")
    parser.add_argument("--replicas", type=int, default=None,
                        help="MirroredStrategy replicas: GPUs, or logical CPU devices without GPUs")
    for field in ("context_length", "num_layers", "num_heads", "hidden_dim", "dropout"):
        kind = float if field == "dropout" else int
        parser.add_argument("--" + field.replace("_", "-"), type=kind, default=None,
                            help=f"override the preset's {field}")
    for field in dataclasses.fields(TrainConfig):
        flag = "--" + field.name.replace("_", "-")
        if field.name == "mixed_precision":
            parser.add_argument(flag, choices=["float16", "bfloat16"], default=None)
        else:
            default = getattr(defaults, field.name)
            parser.add_argument(flag, type=type(default), default=default,
                                help=f"(default {default})")


def _train(args):
    from gpt_keras.config import GPTConfig
    from gpt_keras.training import TrainConfig, train

    overrides = {
        field: getattr(args, field)
        for field in ("context_length", "num_layers", "num_heads", "hidden_dim", "dropout")
        if getattr(args, field) is not None
    }
    model_config = GPTConfig.from_preset(args.preset, **overrides)
    train_values = {f.name: getattr(args, f.name) for f in dataclasses.fields(TrainConfig)}
    if train_values["max_steps"] < train_values["checkpoint_every"]:
        # Short runs: one checkpoint (and validation) at the end, without extra flags.
        train_values["checkpoint_every"] = train_values["max_steps"]
        train_values["eval_every"] = train_values["max_steps"]
    if train_values["sample_every"] > train_values["max_steps"]:
        train_values["sample_every"] = train_values["max_steps"]
    train_config = TrainConfig(**train_values)
    vocab_size = args.vocab_size
    if args.tokenizer == "bpe" and vocab_size is None:
        vocab_size = 4096
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
    )
    print(f"Run directory: {run.directory}")
    print(f"  model: {run.model_path}\n  checkpoints: {run.checkpoint_dir}\n"
          f"  metrics: {run.metrics_path}\n  loss plot: {run.plot_path}\n"
          f"  TensorBoard: tensorboard --logdir {run.tensorboard_dir}")


def _evaluate(args):
    from gpt_keras.training import evaluate

    result = evaluate(args.run_dir, args.data or [default_corpus()], batch_size=args.batch_size)
    print(f"tokens {result['tokens']}  loss {result['val_loss']:.4f}  "
          f"perplexity {result['val_perplexity']:.3f}  "
          f"bits/char {result['val_bits_per_char']:.4f}  "
          f"bits/byte {result['val_bits_per_byte']:.4f}")


def _generate(args):
    from gpt_keras.generation import TextGenerator
    from gpt_keras.precision import with_weights
    from gpt_keras.tokenizers import load_tokenizer
    from gpt_keras.training import load_model, read_run_config

    if args.tflite:
        from gpt_keras.tflite import TFLiteGenerator

        generator = TFLiteGenerator(args.tflite)
        generator.check_source(args.run_dir)
    else:
        read_run_config(args.run_dir)  # a clear error for a directory that is not a run
        generator = TextGenerator(with_weights(load_model(args.run_dir), args.weights),
                                  load_tokenizer(os.path.join(args.run_dir, "tokenizer")))
    prompt = sys.stdin.read() if args.prompt == "-" else args.prompt
    knobs = dict(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, seed=args.seed)
    for index in range(args.num_samples):
        if args.num_samples > 1:
            print(f"--- sample {index + 1} ---")
        seeded = dict(knobs, seed=None if args.seed is None else args.seed + index)
        if args.stream:
            print(prompt, end="", flush=True)
            for piece in generator.stream(prompt, args.max_new_tokens, **seeded):
                print(piece, end="", flush=True)
            print()
        else:
            print(prompt + generator.generate(prompt, args.max_new_tokens, **seeded))


def _convert(args):
    import json

    from gpt_keras.checkpoints import atomic_write
    from gpt_keras.hf import load_gpt2, save_gpt2
    from gpt_keras.tokenizers import GPT2Tokenizer, load_tokenizer
    from gpt_keras.training import create_run, load_model

    if args.to == "gpt_keras":
        model = load_gpt2(args.source)
        tokenizer = GPT2Tokenizer.from_directory(args.vocab or args.source)
        if tokenizer.vocab_size > model.config.vocab_size:
            raise ValueError(
                f"The tokenizer has {tokenizer.vocab_size} tokens but the checkpoint's vocabulary "
                f"has {model.config.vocab_size}; pass the --vocab files of this checkpoint."
            )
        create_run(args.destination, model, tokenizer, {"huggingface": os.path.abspath(args.source)})
        print(f"Run directory {args.destination}: try `gpt-keras generate {args.destination} "
              "--prompt TEXT`.")
        return
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
    if args.format == "tflite":
        if args.version is not None:
            raise ValueError("--version numbers TF Serving's SavedModel versions; it does not "
                             "apply to --format tflite.")
        import json

        from gpt_keras.tflite import MANIFEST_FILE, export_tflite

        path = export_tflite(args.run_dir, args.out, quantize=args.quantize, force=args.force,
                             weights=args.weights)
        with open(os.path.join(os.path.dirname(path), MANIFEST_FILE), encoding="utf-8") as f:
            signatures = json.load(f)["signatures"]
        print(f"TFLite model written to {path}. Signatures:")
    else:
        if args.quantize is not None:
            raise ValueError("--quantize applies to --format tflite; the SavedModel is float32.")
        from gpt_keras.serving import export_saved_model, read_manifest

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
    from gpt_keras.server import serve

    serve(args.base_dir, host=args.host, port=args.port, quiet=args.quiet,
          model_name=args.model_name, poll_seconds=args.poll_seconds,
          num_versions=args.num_versions, max_request_bytes=args.max_request_bytes,
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
    parser.add_argument("--max-request-bytes", type=int, default=4 * 1024 * 1024,
                        help="larger request bodies get HTTP 413 (default 4 MiB)")
    parser.add_argument("--workers", type=int, default=8,
                        help="threads running predictions concurrently (default 8)")
    parser.add_argument("--quiet", action="store_true", help="no log line per request")
    parser.add_argument("--enable-batching", action="store_true",
                        help="batch concurrent requests as TF Serving's --enable_batching")
    parser.add_argument("--batching-parameters-file", metavar="FILE",
                        help="BatchingParameters text proto (e.g. export/batching_parameters.txt)")


def build_parser():
    parser = argparse.ArgumentParser(
        prog="gpt-keras", description="Train, evaluate and use GPT models built with Keras."
    )
    commands = parser.add_subparsers(dest="command", required=True)
    train_parser = commands.add_parser("train", help="train (or resume) a model on text files")
    _add_train_arguments(train_parser)
    train_parser.set_defaults(handler=_train)
    evaluate_parser = commands.add_parser(
        "evaluate", help="loss, perplexity and bits per char of a run on text files"
    )
    evaluate_parser.add_argument("run_dir")
    evaluate_parser.add_argument("--data", nargs="+", help="text to score (default: Tiny Shakespeare)")
    evaluate_parser.add_argument("--batch-size", type=int, default=32)
    evaluate_parser.set_defaults(handler=_evaluate)
    generate_parser = commands.add_parser(
        "generate", help="sample text from a trained run (streams tokens as they are decoded)"
    )
    generate_parser.add_argument("run_dir", metavar="RUN_DIR",
                                 help="a run directory, or with --tflite the export directory")
    generate_parser.add_argument("--tflite", metavar="FILE",
                                 help="generate with this .tflite file (`export --format tflite`) "
                                 "through the LiteRT interpreter; RUN_DIR must be its directory "
                                 "or the run it was exported from")
    generate_parser.add_argument("--prompt", default="", help="text to continue; '-' reads stdin "
                                 "(default: empty, i.e. unconditional)")
    generate_parser.add_argument("--max-new-tokens", type=int, default=200)
    generate_parser.add_argument("--temperature", type=float, default=0.8,
                                 help="0 for greedy decoding")
    generate_parser.add_argument("--top-k", type=int, default=None)
    generate_parser.add_argument("--top-p", type=float, default=None)
    generate_parser.add_argument("--seed", type=int, default=None)
    generate_parser.add_argument("--num-samples", type=int, default=1)
    generate_parser.add_argument("--stream", action=argparse.BooleanOptionalAction, default=True,
                                 help="print tokens as they are produced (default)")
    generate_parser.add_argument("--weights", choices=WEIGHT_FORMATS, default="float32",
                                 help="decode with the weights in this format (bfloat16: half "
                                 "the bytes; int8: weight-only int8, a quarter)")
    generate_parser.set_defaults(handler=_generate)
    convert_parser = commands.add_parser(
        "convert", help="Hugging Face GPT-2 checkpoint -> run directory, or back (--to hf)"
    )
    convert_parser.add_argument("source", help="HF_DIR (default) or RUN_DIR (with --to hf)")
    convert_parser.add_argument("destination", help="RUN_DIR (default) or HF_DIR (with --to hf)")
    convert_parser.add_argument("--to", choices=["gpt_keras", "hf"], default="gpt_keras")
    convert_parser.add_argument("--vocab", help="directory with encoder.json + vocab.bpe (or "
                                "vocab.json + merges.txt) when HF_DIR has none")
    convert_parser.set_defaults(handler=_convert)
    export_parser = commands.add_parser(
        "export", help="a run -> a verified TF Serving SavedModel version (or TFLite)"
    )
    export_parser.add_argument("run_dir", metavar="RUN_DIR")
    export_parser.add_argument("--out", required=True, metavar="MODELS/NAME",
                               help="the model's base path; SavedModel versions go in numbered "
                               "directories under it")
    export_parser.add_argument("--version", type=int, default=None,
                               help="version number (default: the next free one, 1 if none)")
    export_parser.add_argument("--force", action="store_true",
                               help="replace an existing version (or TFLite export)")
    export_parser.add_argument("--format", choices=["saved_model", "tflite"],
                               default="saved_model")
    export_parser.add_argument("--quantize", choices=["float16", "int8"], default=None,
                               help="TFLite's own weight quantization (with --format tflite)")
    export_parser.add_argument("--weights", choices=WEIGHT_FORMATS, default="float32",
                               help="export the weights in this format (gpt_keras.precision; "
                               "TFLite: float32 or int8)")
    export_parser.set_defaults(handler=_export)
    serve_parser = commands.add_parser(
        "serve", help="a development server speaking TF Serving's REST API over exported versions"
    )
    _add_serve_arguments(serve_parser)
    serve_parser.set_defaults(handler=_serve)
    return parser


def main(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        args.handler(args)
    except (ValueError, FloatingPointError) as error:
        parser.exit(2, f"gpt-keras: error: {error}\n")


if __name__ == "__main__":
    sys.exit(main())
