"""How close the grader's runtimes come to this CPU's arithmetic ceiling, per precision.

Three figures, all measured here:

* **The grader's work per crop**: the float operations of one forward pass of the Keras
  grader on a 224x224 crop, counted by TensorFlow's profiler on the traced graph (2 per
  multiply-add, plus the element-wise work).
* **The CPU's practical ceiling per precision**: the best rate of a large matrix product
  (``--gemm`` sides, square, all cores): float32 and bfloat16 by PyTorch and TensorFlow, the faster
  of the two, int8 by ``torch._int_mm`` (int32 accumulation, VNNI where the CPU has it). A
  dense matrix product is the best case: convolutions, above all depthwise ones, rarely
  reach it.
* **Each runtime's rate** on ``--crops`` val crops, best of ``--rounds``: Keras float32,
  Keras with the mixed bfloat16 policy, and the compiled INT8 OpenVINO network (the CPU
  default). Each rate times the work per crop, over the ceiling of its precision, is the
  share of the ceiling it reaches.

    python benchmarks/grader_ceiling.py                  # 256 val crops, 2 rounds
    python benchmarks/grader_ceiling.py --crops 826 --rounds 3
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from kneepipe.grade.data import labelled_files, load_crops
from kneepipe.grade.predict import Grader
from kneepipe.runtime import prepare_frameworks

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


def forward_flops(model, size: int) -> int:
    """FLOPs of one forward pass of a Keras model on one ``size`` square crop (TensorFlow's profiler).

    The graph is traced for a fixed input, its variables frozen, and TensorFlow's float
    operation count taken: 2 per multiply-add of every convolution and matrix product,
    plus the element-wise work (batch norms, activations, pooling).
    """
    import tensorflow as tf
    from tensorflow.python.framework.convert_to_constants import convert_variables_to_constants_v2
    from tensorflow.python.profiler.model_analyzer import profile
    from tensorflow.python.profiler.option_builder import ProfileOptionBuilder

    channels = model.inputs[0].shape[-1]
    forward = tf.function(lambda x: model(x, training=False))
    concrete = forward.get_concrete_function(tf.TensorSpec([1, size, size, channels], tf.float32))
    graph = convert_variables_to_constants_v2(concrete).graph
    options = ProfileOptionBuilder(ProfileOptionBuilder.float_operation()).with_empty_output().build()
    return int(profile(graph, options=options).total_float_ops)


def _best_seconds(product, repeats: int) -> float:
    product()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        product()
        best = min(best, time.perf_counter() - start)
    return best


def gemm_ceiling(size: int, dtype: str, repeats: int = 5) -> tuple[float, str]:
    """Best FLOP/s of a ``size`` square matrix product in ``dtype`` on all cores, and the library that gave it.

    float32 and bfloat16 are tried in PyTorch and in TensorFlow (their CPU kernels differ:
    PyTorch's float32 product reached half of TensorFlow's on an AMD EPYC); int8 in
    PyTorch's ``_int_mm`` (int32 accumulation).
    """
    import tensorflow as tf
    import torch

    generator = torch.Generator().manual_seed(0)
    if dtype == "int8":
        a = torch.randint(-128, 128, (size, size), dtype=torch.int8, generator=generator)
        b = torch.randint(-128, 128, (size, size), dtype=torch.int8, generator=generator)
        return 2.0 * size**3 / _best_seconds(lambda: torch._int_mm(a, b), repeats), "torch._int_mm"
    kind = {"float32": torch.float32, "bfloat16": torch.bfloat16}[dtype]
    x = torch.randn(size, size, generator=generator).to(kind)
    y = torch.randn(size, size, generator=generator).to(kind)
    rates = {"torch.matmul": 2.0 * size**3 / _best_seconds(lambda: x @ y, repeats)}
    tf_x, tf_y = tf.cast(tf.constant(x.float().numpy()), dtype), tf.cast(tf.constant(y.float().numpy()), dtype)
    matmul = tf.function(tf.linalg.matmul, autograph=False)
    rates["tf.linalg.matmul"] = 2.0 * size**3 / _best_seconds(lambda: matmul(tf_x, tf_y).numpy(), repeats)
    library = max(rates, key=lambda name: rates[name])
    return rates[library], library


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--val", type=Path, default=DATA / "oai-kl224" / "val")
    parser.add_argument("--crops", type=int, default=256, help="val crops graded per runtime and round")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--gemm", default="2048,4096", help="sides of the square matrix products tried (best kept)")
    args = parser.parse_args()

    prepare_frameworks()
    import torch

    val = load_crops(*labelled_files(args.val))
    crops = val.crops[: args.crops]
    runtimes = {
        "Keras float32": ("float32", Grader.load(runtime="keras")),
        "Keras mixed bfloat16": ("bfloat16", Grader.load(precision="bfloat16", runtime="keras")),
        "OpenVINO INT8 (default)": ("int8", Grader.load(runtime="openvino")),
    }
    flops = forward_flops(runtimes["Keras float32"][1].model, 224)
    for _, grader in runtimes.values():
        grader.predict_logits(crops[:8])  # warm-up
    seconds: dict[str, float] = dict.fromkeys(runtimes, float("inf"))
    for _ in range(args.rounds):
        for name, (_, grader) in runtimes.items():
            start = time.perf_counter()
            grader.predict_logits(crops, args.batch)
            seconds[name] = min(seconds[name], time.perf_counter() - start)
    sizes = [int(side) for side in args.gemm.split(",")]
    ceilings = {
        dtype: max((gemm_ceiling(side, dtype) for side in sizes), key=lambda found: found[0])
        for dtype in ("float32", "bfloat16", "int8")
    }

    print(f"grader: {flops / 1e9:.2f} GFLOPs per 224x224 crop")
    print(f"{torch.get_num_threads()} threads; {len(crops)} crops, best of {args.rounds} interleaved rounds")
    print("| runtime | precision | crops/s | GFLOP/s | GEMM ceiling GFLOP/s (by) | share of it | crops/s at it |")
    print("|---|---|---|---|---|---|---|")
    for name, (dtype, _) in runtimes.items():
        rate = len(crops) / seconds[name]
        achieved = rate * flops
        ceiling, library = ceilings[dtype]
        print(
            f"| {name} | {dtype} | {rate:.1f} | {achieved / 1e9:.0f} | {ceiling / 1e9:.0f} ({library}) | "
            f"{achieved / ceiling:.0%} | {ceiling / flops:.0f} |"
        )


if __name__ == "__main__":
    main()
