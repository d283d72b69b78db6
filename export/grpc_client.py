"""Completions from a gpt_keras model served by TF Serving, over gRPC (port 8500):

    python export/grpc_client.py --model shakespeare "To be, or not" "ROMEO:"
    python export/grpc_client.py --model shakespeare --temperature 0 --max-new-tokens 50 "To be"
    python export/grpc_client.py --model shakespeare --repetition-penalty 1.3 --stop $'\n\n' "ROMEO:"

Calls the `generate` signature (see export/README.md). Needs only `tensorflow` (or
`tensorflow-cpu`) and `tensorflow-serving-api`: neither Keras nor gpt_keras.
"""

import argparse

import grpc
import numpy as np
import tensorflow as tf
from tensorflow_serving.apis import predict_pb2, prediction_service_pb2_grpc


def generate_request(model, prompts, max_new_tokens=200, temperature=0.8, top_k=200, top_p=1.0,
                     seed=0, version=None, repetition_penalty=1.0, min_new_tokens=0,
                     banned_token_ids=(), logit_bias=None, stop_strings=()):
    """A `PredictRequest` for the `generate` signature of `model` (the latest version, or
    `version`): every input is required (empty lists turn a knob off); the sampling knobs are
    scalars; `logit_bias` is `{token id: value}`."""
    logit_bias = logit_bias or {}
    request = predict_pb2.PredictRequest()
    request.model_spec.name = model
    request.model_spec.signature_name = "generate"
    if version is not None:
        request.model_spec.version.value = version
    inputs = {
        "prompts": tf.make_tensor_proto([p.encode("utf-8") for p in prompts], tf.string),
        "max_new_tokens": tf.make_tensor_proto(max_new_tokens, tf.int32),
        "temperature": tf.make_tensor_proto(temperature, tf.float32),
        "top_k": tf.make_tensor_proto(top_k, tf.int32),
        "top_p": tf.make_tensor_proto(top_p, tf.float32),
        "seed": tf.make_tensor_proto(seed, tf.int64),
        "repetition_penalty": tf.make_tensor_proto(repetition_penalty, tf.float32),
        "min_new_tokens": tf.make_tensor_proto(min_new_tokens, tf.int32),
        "banned_token_ids": tf.make_tensor_proto(list(banned_token_ids), tf.int32,
                                                 [len(banned_token_ids)]),
        "bias_token_ids": tf.make_tensor_proto(list(logit_bias), tf.int32, [len(logit_bias)]),
        "bias_values": tf.make_tensor_proto(list(logit_bias.values()), tf.float32,
                                            [len(logit_bias)]),
        "stop_strings": tf.make_tensor_proto([s.encode("utf-8") for s in stop_strings],
                                             tf.string, [len(stop_strings)]),
    }
    for name, proto in inputs.items():
        request.inputs[name].CopyFrom(proto)
    return request


def completions(response):
    """The completions `[str]` and new token ids (lists, padding dropped) of a `generate`
    `PredictResponse`."""
    texts = [t.decode("utf-8") for t in tf.make_ndarray(response.outputs["completions"])]
    ids = tf.make_ndarray(response.outputs["token_ids"])
    return texts, [row[row >= 0].tolist() for row in np.asarray(ids)]


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("prompts", nargs="+")
    parser.add_argument("--server", default="localhost:8500")
    parser.add_argument("--model", required=True, help="the model name in TF Serving")
    parser.add_argument("--version", type=int, help="a model version (default: the latest)")
    parser.add_argument("--max-new-tokens", type=int, default=200)
    parser.add_argument("--temperature", type=float, default=0.8, help="0 for greedy decoding")
    parser.add_argument("--top-k", type=int, default=200)
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--repetition-penalty", type=float, default=1.0, help="1 = off")
    parser.add_argument("--min-new-tokens", type=int, default=0)
    parser.add_argument("--ban", type=int, action="append", default=[], help="a token id")
    parser.add_argument("--stop", action="append", default=[], help="a stop string")
    parser.add_argument("--timeout", type=float, default=60.0, help="seconds")
    args = parser.parse_args()
    request = generate_request(args.model, args.prompts, args.max_new_tokens, args.temperature,
                               args.top_k, args.top_p, args.seed, args.version,
                               args.repetition_penalty, args.min_new_tokens, args.ban,
                               stop_strings=args.stop)
    with grpc.insecure_channel(args.server) as channel:
        stub = prediction_service_pb2_grpc.PredictionServiceStub(channel)
        response = stub.Predict(request, timeout=args.timeout)
    for prompt, text in zip(args.prompts, completions(response)[0]):
        print(f"--- {prompt!r}\n{prompt}{text}")


if __name__ == "__main__":
    main()
