"""Graph helpers shared by the Outpost ONNX exporters (make_tiny_gemma4.py, prepare_gemma3.py).

tract 0.23.9 loads graphs exported with torch.onnx.export(dynamo=True, opset 18) once a few
rewrites are applied (`tractify`, `fold_shape_only_ranges`); `rename_dims` gives the exporter's
symbolic dims stable names, `graph_io` describes the inputs/outputs for the bundle manifest and
`quantize_q4_0` rewrites constant-weight MatMuls into com.microsoft MatMulNBits (Q4_0 layout).
"""
from __future__ import annotations

import hashlib
import os
import sys
from pathlib import Path

import numpy as np


def fix_string_hashing():
    """Re-executes the script with PYTHONHASHSEED=0 unless it is set: transformers iterates over a
    set of layer-type strings while building the decoder graph, so without it the exported node
    order, and so the file bytes, change from run to run."""
    if os.environ.get("PYTHONHASHSEED") != "0":
        os.environ["PYTHONHASHSEED"] = "0"
        os.execv(sys.executable, [sys.executable, *sys.argv])


def _as_model(x):
    """(ModelProto, loaded_from_path) for a path or an in-memory ModelProto."""
    import onnx

    if isinstance(x, onnx.ModelProto):
        return x, False
    return onnx.load(str(x)), True


def tractify(path):
    """Rewrites needed by tract 0.23: Equal on bool -> Not(Xor); constant Range -> Constant; and
    two for speed: GELU's tanh form -> FastGelu (`fuse_tanh_gelu`), and Pow by a constant 2 or 3
    (the RMS norms' squares) -> Mul, as tract calls powf for each element, several percent of a
    prefill.
    `path` is a file (rewritten in place) or a ModelProto (modified in place, not saved)."""
    import onnx
    from onnx import helper, numpy_helper, shape_inference

    m, from_path = _as_model(path)
    inferred = m
    if any(n.op_type == "Equal" for n in m.graph.node):  # types only matter for Equal (costly on big graphs)
        try:
            inferred = shape_inference.infer_shapes(m)
        except Exception:
            inferred = m
    types = {}
    for vi in list(inferred.graph.value_info) + list(inferred.graph.input) + list(inferred.graph.output):
        types[vi.name] = vi.type.tensor_type.elem_type
    consts = {i.name: numpy_helper.to_array(i) for i in m.graph.initializer}
    for n in m.graph.node:
        if n.op_type == "Constant":
            for a in n.attribute:
                if a.name == "value":
                    consts[n.output[0]] = numpy_helper.to_array(a.t)
                    types[n.output[0]] = a.t.data_type
    for i in m.graph.initializer:
        types[i.name] = i.data_type
    stats = {"equal_bool": 0, "range_folded": 0, "pow_to_mul": 0, "tanh_gelu": fuse_tanh_gelu(m, consts)}
    new_nodes = []
    for n in m.graph.node:
        if n.op_type == "Equal" and all(types.get(x) == onnx.TensorProto.BOOL for x in n.input):
            x = n.output[0] + "__xor"
            new_nodes.append(helper.make_node("Xor", list(n.input), [x], name=n.name + "_xor"))
            new_nodes.append(helper.make_node("Not", [x], list(n.output), name=n.name + "_not"))
            stats["equal_bool"] += 1
            continue
        if n.op_type == "Range" and all(x in consts for x in n.input):
            s, l, d = (consts[x] for x in n.input)
            arr = np.arange(s, l, d, dtype=s.dtype)
            new_nodes.append(helper.make_node("Constant", [], list(n.output), name=n.name + "_folded",
                                              value=numpy_helper.from_array(arr)))
            stats["range_folded"] += 1
            continue
        exponent = consts.get(n.input[1]) if n.op_type == "Pow" else None
        if exponent is not None and exponent.size == 1 and float(exponent.reshape(())) in (2.0, 3.0):
            x, out = n.input[0], n.output[0]
            if float(exponent.reshape(())) == 2.0:
                new_nodes.append(helper.make_node("Mul", [x, x], [out], name=n.name + "_square"))
            else:
                new_nodes.append(helper.make_node("Mul", [x, x], [out + "__square"], name=n.name + "_square"))
                new_nodes.append(helper.make_node("Mul", [out + "__square", x], [out], name=n.name + "_cube"))
            stats["pow_to_mul"] += 1
            continue
        new_nodes.append(n)
    del m.graph.node[:]
    m.graph.node.extend(new_nodes)
    # drop the exporter's per-node metadata (stack traces, module paths): most of the file size
    for n in m.graph.node:
        del n.metadata_props[:]
        n.doc_string = ""
    del m.metadata_props[:]
    if not needs_external_data(m):  # the checker cannot take a proto over 2 GB
        onnx.checker.check_model(m)
    if from_path:
        save_graph(m, path)
    return stats


def fuse_tanh_gelu(m, consts) -> int:
    """GELU's tanh form, 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3))), which the exporter
    spells in eight nodes over the whole MLP width, becomes one com.microsoft FastGelu (no bias):
    tract runs it as a single vectorised pass (its GeluApproximate, through outpostd's parser),
    onnxruntime as its own fused kernel. Returns how many were fused."""
    from onnx import helper

    users = {}
    for n in m.graph.node:
        for i in n.input:
            users.setdefault(i, []).append(n)

    def only_user(out, op):
        found = users.get(out, [])
        return found[0] if len(found) == 1 and found[0].op_type == op else None

    def other(n, name):
        if n is None or len(n.input) != 2 or name not in n.input:
            return None
        return n.input[1] if n.input[0] == name else n.input[0]

    def scalar(name, value):
        c = consts.get(name)
        return c is not None and c.size == 1 and np.isclose(float(c.reshape(())), value, rtol=1e-6, atol=0)

    fused = {}  # id of the last node -> FastGelu node; the other seven are dropped
    dropped = set()
    for pow_node in m.graph.node:
        if pow_node.op_type != "Pow" or not scalar(pow_node.input[1], 3.0):
            continue
        x = pow_node.input[0]
        chain = [pow_node]
        for op, operand in [("Mul", lambda o: scalar(o, 0.044715)), ("Add", lambda o: o == x),
                            ("Mul", lambda o: scalar(o, float(np.sqrt(2 / np.pi)))), ("Tanh", None),
                            ("Add", lambda o: scalar(o, 1.0)), ("Mul", lambda o: scalar(o, 0.5)),
                            ("Mul", lambda o: o == x)]:
            n = only_user(chain[-1].output[0], op)
            if n is None or (operand is not None and not operand(other(n, chain[-1].output[0]))):
                break
            chain.append(n)
        else:
            last = chain[-1]
            fused[id(last)] = helper.make_node("FastGelu", [x], list(last.output), domain="com.microsoft",
                                               name=pow_node.name + "_fast_gelu")
            dropped.update(id(n) for n in chain[:-1])
    if not fused:
        return 0
    nodes = [fused.get(id(n), n) for n in m.graph.node if id(n) not in dropped]
    del m.graph.node[:]
    m.graph.node.extend(nodes)
    if not any(o.domain == "com.microsoft" for o in m.opset_import):
        m.opset_import.append(helper.make_opsetid("com.microsoft", 1))
    return len(fused)


def fold_shape_only_ranges(path: Path):
    """For graphs with fully static input shapes (the audio encoder): every Range whose inputs depend
    only on initializers and Shape ops is evaluated once with onnxruntime and replaced by a Constant
    (tract-hir's Range rule mis-computes negative steps)."""
    import onnx
    import onnxruntime as ort
    from onnx import helper, numpy_helper

    m = onnx.load(str(path))
    prod = {o: n for n in m.graph.node for o in n.output}
    inputs = {i.name for i in m.graph.input}
    memo = {}

    def data_dep(name):
        if name in memo:
            return memo[name]
        memo[name] = False
        n = prod.get(name)
        if name in inputs:
            r = True
        elif n is None or n.op_type == "Shape":
            r = False
        else:
            r = any(data_dep(x) for x in n.input if x)
        memo[name] = r
        return r

    targets = [n for n in m.graph.node if n.op_type == "Range" and not any(data_dep(x) for x in n.input)]
    if not targets:
        return 0
    probe = onnx.ModelProto()
    probe.CopyFrom(m)
    del probe.graph.output[:]
    wanted = [x for n in targets for x in n.input]
    for x in dict.fromkeys(wanted):
        probe.graph.output.append(helper.make_empty_tensor_value_info(x))
    so = ort.SessionOptions()
    so.log_severity_level = 3
    sess = ort.InferenceSession(probe.SerializeToString(), so, providers=["CPUExecutionProvider"])
    feed = {}
    for i in sess.get_inputs():
        shape = [d if isinstance(d, int) else 1 for d in i.shape]
        feed[i.name] = np.zeros(shape, dtype=np.bool_ if i.type == "tensor(bool)" else np.float32)
    vals = dict(zip(dict.fromkeys(wanted), sess.run(None, feed)))
    tset = {id(n) for n in targets}
    new_nodes = []
    for n in m.graph.node:
        if id(n) in tset:
            st, li, de = (vals[x] for x in n.input)
            arr = np.arange(st, li, de, dtype=st.dtype)
            new_nodes.append(helper.make_node("Constant", [], list(n.output), name=n.name + "_folded",
                                              value=numpy_helper.from_array(arr)))
        else:
            new_nodes.append(n)
    del m.graph.node[:]
    m.graph.node.extend(new_nodes)
    if not needs_external_data(m):
        onnx.checker.check_model(m)
    save_graph(m, path)
    return len(targets)


def export(module, args, path: Path, input_names, output_names, dynamic_shapes, optimize=True):
    """torch.onnx.export(dynamo=True, opset 18) to `path`, then `tractify` it."""
    import torch

    prog = torch.onnx.export(
        module, tuple(args), dynamo=True, opset_version=18, input_names=input_names,
        output_names=output_names, dynamic_shapes=dynamic_shapes, optimize=optimize,
        external_data=False, verify=False, report=False)
    big = sum(p.numel() for p in module.parameters()) * 4 > EXTERNAL_DATA_BYTES
    prog.save(str(path), external_data=big)
    return tractify(path)


def lean_optimize(model_ir):
    """A cheaper stand-in for the exporter's `optimize=True` (onnxscript optimize_ir + fusions),
    whose pattern rewriter takes most of the export time on a large graph (about a minute for
    the 18-layer Gemma 3 decoder on 2 cores): constant folding and the no-op rules only, then the
    same clean-up passes (unused nodes, constants lifted to initializers, deduplication, CSE, name
    fixes). On Gemma 3 270M it gives the same outputs, with 6 more shape-plumbing nodes."""
    import onnx_ir as ir
    import onnx_ir.passes.common as common_passes
    from onnxscript import rewriter
    from onnxscript.optimizer import _constant_folding
    from onnxscript.rewriter import _no_op

    passes = ir.passes.Sequential(
        common_passes.InlinePass(),
        ir.passes.PassManager(
            [_constant_folding.FoldConstantsPass(
                shape_inference=True,
                input_size_limit=_constant_folding.DEFAULT_CONSTANT_FOLD_INPUT_SIZE_LIMIT,
                output_size_limit=_constant_folding.DEFAULT_CONSTANT_FOLD_OUTPUT_SIZE_LIMIT,
                should_fold=lambda node: None),
             rewriter.RewritePass(list(_no_op.rules)),
             common_passes.RemoveUnusedNodesPass(),
             common_passes.RemoveUnusedFunctionsPass(),
             common_passes.RemoveUnusedOpsetsPass()],
            steps=2, early_stop=True),
        common_passes.RemoveUnusedNodesPass(),
        common_passes.LiftConstantsToInitializersPass(lift_all_constants=True, size_limit=0),
        common_passes.LiftSubgraphInitializersToMainGraphPass(),
        common_passes.DeduplicateInitializersPass(),
        common_passes.CommonSubexpressionEliminationPass(),
        common_passes.OutputFixPass(),
        common_passes.NameFixPass(),
    )
    passes(model_ir)


def export_model(module, args, input_names, output_names, dynamic_shapes, optimize="lean"):
    """Like `export`, in memory: returns (ModelProto, tractify stats) without touching the disk
    (for large graphs, where every save/load round trip costs seconds). optimize: True (the
    exporter's optimizer), "lean" (`lean_optimize`) or False."""
    import torch

    prog = torch.onnx.export(
        module, tuple(args), dynamo=True, opset_version=18, input_names=input_names,
        output_names=output_names, dynamic_shapes=dynamic_shapes, optimize=optimize is True,
        external_data=False, verify=False, report=False)
    if optimize == "lean":
        lean_optimize(prog.model)
    m = prog.model_proto
    del prog
    return m, tractify(m)


def graph_io(path):
    """Inputs/outputs (name, dtype, shape with named dims), opset and op types of a graph file or
    ModelProto."""
    import onnx

    m, _ = _as_model(path)
    def desc(vi):
        tt = vi.type.tensor_type
        dims = [d.dim_param if d.dim_param else d.dim_value for d in tt.shape.dim]
        return {"name": vi.name, "dtype": onnx.helper.tensor_dtype_to_np_dtype(tt.elem_type).name, "shape": dims}
    return {"inputs": [desc(v) for v in m.graph.input], "outputs": [desc(v) for v in m.graph.output],
            "opset": m.opset_import[0].version,
            "ops": sorted({n.op_type for n in m.graph.node})}


def rename_dims(path, names: dict):
    """Give the exporter's symbolic dims (s0, s1, ...) stable names, by input/output position.
    `path` is a file (rewritten in place) or a ModelProto (modified in place, not saved)."""
    m, from_path = _as_model(path)
    mapping = {}
    for vi in list(m.graph.input) + list(m.graph.output):
        for ax, d in enumerate(vi.type.tensor_type.shape.dim):
            key = (vi.name, ax)
            if key in names and d.dim_param:
                mapping[d.dim_param] = names[key]
    for vi in list(m.graph.input) + list(m.graph.output) + list(m.graph.value_info):
        for d in vi.type.tensor_type.shape.dim:
            if d.dim_param in mapping:
                d.dim_param = mapping[d.dim_param]
    if from_path:
        save_graph(m, path)
    return mapping


def kv_names(n_cache):
    """The decoders' KV tensor names, in graph order: (past_key_0, past_value_0, ...),
    (present_key_0, present_value_0, ...)."""
    kv_in, kv_out = [], []
    for i in range(n_cache):
        kv_in += [f"past_key_{i}", f"past_value_{i}"]
        kv_out += [f"present_key_{i}", f"present_value_{i}"]
    return kv_in, kv_out


def decoder_cache_and_masks(past, seq, sliding_window):
    """What an exported decoder wrapper hands the HF model: a plain DynamicCache filled with the
    past K/V tensors (key_0, value_0, key_1, ...; no sliding-window cache: its Slice(starts=-W)
    trips tract), positions past_len + arange(seq) and explicit additive masks (causal; sliding
    layers also q - k < sliding_window). Returns (cache, position_ids, attention_mask)."""
    import torch
    from transformers.cache_utils import DynamicCache

    past_len = past[0].shape[2]
    cache = DynamicCache()
    for i in range(len(past) // 2):
        cache.update(past[2 * i], past[2 * i + 1], i)
    q_pos = torch.arange(seq) + past_len
    k_pos = torch.arange(past_len + seq)
    # tract holds integers computed from shapes as symbolic values, one by one: in int32 the
    # [seq, past + seq] comparisons are plain integer work (they were half a 512-token prefill).
    q_i32, k_i32 = q_pos.to(torch.int32), k_pos.to(torch.int32)
    causal = k_i32[None, :] <= q_i32[:, None]
    window = (q_i32[:, None] - k_i32[None, :]) < sliding_window
    neg = torch.finfo(torch.float32).min
    zero = torch.zeros((), dtype=torch.float32)
    full_mask = torch.where(causal, zero, neg)[None, None]
    slide_mask = torch.where(causal & window, zero, neg)[None, None]
    return cache, q_pos[None], {"full_attention": full_mask, "sliding_attention": slide_mask}


def cache_presents(cache, n_cache):
    """The present K/V tensors of the cache-owning layers, in graph order."""
    presents = []
    for i in range(n_cache):
        presents += [cache.layers[i].keys, cache.layers[i].values]
    return presents


# A protobuf message cannot exceed 2 GiB: larger graphs keep their weights in NAME.onnx.data
# beside the graph (ONNX external data, which tract reads relative to the graph's directory).
EXTERNAL_DATA_BYTES = 1 << 30


def needs_external_data(m) -> bool:
    return sum(len(i.raw_data) for i in m.graph.initializer) > EXTERNAL_DATA_BYTES


def save_graph(m, path):
    """onnx.save, with the weights in `<path>.data` when the graph is too large for one protobuf.
    Returns the files written (the graph, and its data file if any)."""
    import onnx

    path = Path(path)
    data = path.with_name(path.name + ".data")
    if data.exists():
        data.unlink()
    if needs_external_data(m):
        onnx.save(m, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                  location=data.name, size_threshold=1024)
        return [path, data]
    onnx.save(m, str(path))
    return [path]


def sha256(p: Path):
    h = hashlib.sha256()
    with open(p, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 24), b""):
            h.update(chunk)
    return h.hexdigest()


def maxdiff(a, b):
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    assert a.shape == b.shape, (a.shape, b.shape)
    return float(np.abs(a - b).max()) if a.size else 0.0


# ----------------------------------------------------------------------------------------------
# Q4_0 weight quantization (com.microsoft MatMulNBits, bits 4, block 32, no zero points)
# ----------------------------------------------------------------------------------------------

Q4_BLOCK = 32


def q4_0_pack(w_nk: np.ndarray, search: bool = False, importance: np.ndarray | None = None):
    """llama.cpp Q4_0 of a [N, K] weight (each row of K split into blocks of 32).

    Default (llama.cpp's reference quantize_row_q4_0): per block the value of largest magnitude
    m gives d = m / -8 (stored as f16 by tract and llama.cpp, so it is rounded to f16 here too),
    q = clamp(floor(x / d + 8.5), 0, 15).
    search=True or importance given (llama.cpp's make_qx_quants, as quantize_row_q4_0_impl uses
    it): the codes l = clamp(round(x * -(8 + 0.1 i) / m), -8, 7) are tried for i = -9..9 (and
    the reference scale), d is refitted by weighted least squares for each, and the candidate
    with the smallest weighted squared error is kept. The weights are uniform, or with
    `importance` (per input channel, [K]: the mean squared activation, an "imatrix") llama.cpp's
    importance[k] * sqrt(sigma2 + x^2), sigma2 the block's mean square.
    Returns B uint8 [N, K/32, 16] (nibble i of a block at byte i/2, low nibble first), the
    scales f32 [N * K/32] and the dequantized weight (q - 8) * d as f32 [N, K]."""
    w = np.asarray(w_nk, dtype=np.float32)
    n, k = w.shape
    assert k % Q4_BLOCK == 0, f"K={k} is not a multiple of {Q4_BLOCK}"
    x = w.reshape(n, k // Q4_BLOCK, Q4_BLOCK)
    idx = np.abs(x).argmax(axis=-1)
    m = np.take_along_axis(x, idx[..., None], axis=-1)[..., 0]
    if search or importance is not None:
        if importance is None:
            wt = np.ones_like(x)
        else:
            qw = np.asarray(importance, np.float32).reshape(1, k // Q4_BLOCK, Q4_BLOCK)
            sigma2 = (x * x).mean(-1, keepdims=True)
            wt = qw * np.sqrt(sigma2 + x * x)
        safe_m = np.where(m == 0, np.float32(1.0), m)
        best_score = best_d = best_l = None
        for i in [None, *range(-9, 10)]:
            iscale = np.float32(-8.0 if i is None else -(8.0 + 0.1 * i)) / safe_m
            ll = np.clip(np.round(x * iscale[..., None]), -8, 7)
            sumlx = (wt * x * ll).sum(-1)
            suml2 = (wt * ll * ll).sum(-1)
            ok = suml2 > 0
            dd = np.where(ok, sumlx / np.where(ok, suml2, 1), 0).astype(np.float32)
            score = np.where(ok, sumlx * dd, -1)  # = sumlx^2 / suml2: larger is a smaller error
            if best_score is None:
                best_score, best_d, best_l = score, dd, ll
            else:
                better = score > best_score
                best_score = np.where(better, score, best_score)
                best_d = np.where(better, dd, best_d)
                best_l = np.where(better[..., None], ll, best_l)
        d = np.where(m == 0, 0, best_d).astype(np.float16).astype(np.float32)
        q = (best_l + np.float32(8.0)).astype(np.uint8)
    else:
        d = (m / np.float32(-8.0)).astype(np.float16).astype(np.float32)
        safe = np.where(d == 0, np.float32(1.0), d)
        q = np.floor(x / safe[..., None] + np.float32(8.5))
        q = np.where(d[..., None] == 0, np.float32(8.0), q)
        q = np.clip(q, 0, 15).astype(np.uint8)
    packed = (q[..., 0::2] | (q[..., 1::2] << 4)).astype(np.uint8)
    deq = ((q.astype(np.float32) - 8.0) * d[..., None]).reshape(n, k)
    return packed, d.reshape(-1).astype(np.float32), deq


def q4_0_unpack(packed: np.ndarray, scales: np.ndarray):
    """Inverse of q4_0_pack's layout (what tract and onnxruntime read): -> f32 [N, K]."""
    n, nb, _ = packed.shape
    q = np.empty((n, nb, Q4_BLOCK), np.uint8)
    q[..., 0::2] = packed & 0x0F
    q[..., 1::2] = packed >> 4
    return ((q.astype(np.float32) - 8.0) * scales.reshape(n, nb, 1)).reshape(n, nb * Q4_BLOCK)


def quantize_q4_0(m, select=None, min_k=Q4_BLOCK, search=False, importance=None, log=print):
    """Rewrites, in the ModelProto `m` (in place), every MatMul whose second input is a constant
    2-D weight W [K, N] (an initializer, or Transpose(perm=[1, 0]) of an initializer [N, K]) into
    a com.microsoft MatMulNBits node (bits=4, block_size=32, K, N; inputs A, B uint8
    [N, K/32, 16], scales f32 [N * K/32]; no zero points, so the zero point is 8: GGML's Q4_0,
    which the runtime multiplies with its own kernels, daemon/src/model/block_matmul.rs).

    select(node, weight_name, K, N) -> bool chooses the nodes (default: all candidates);
    search: see q4_0_pack; importance: {MatMul input name: mean squared activation [K]}
    (see `activation_importance`), used for the nodes it names.
    K must be a multiple of 32 (checked for every rewritten node). Initializers and Transpose
    nodes left unused are removed. Returns a list of {node, weight, K, N, rmse, max_abs_err}."""
    from onnx import helper, numpy_helper

    g = m.graph
    inits = {i.name: i for i in g.initializer}
    producers = {o: n for n in g.node for o in n.output}
    done = []
    new_nodes = []
    for node in g.node:
        if node.op_type != "MatMul" or node.domain not in ("", "ai.onnx"):
            new_nodes.append(node)
            continue
        src, w_nk = _constant_weight(node, inits, producers)
        if w_nk is None or w_nk.dtype != np.float32:
            new_nodes.append(node)
            continue
        n_out, k_in = w_nk.shape
        if k_in < min_k or (select is not None and not select(node, src, k_in, n_out)):
            new_nodes.append(node)
            continue
        if k_in % Q4_BLOCK != 0:
            raise ValueError(f"{node.name}: K={k_in} is not a multiple of {Q4_BLOCK}")
        imp = importance.get(node.input[0]) if importance else None
        packed, scales, deq = q4_0_pack(w_nk, search=search, importance=imp)
        err = deq - w_nk
        base = f"{src}_q4_0"
        g.initializer.append(numpy_helper.from_array(packed, base + "_B"))
        g.initializer.append(numpy_helper.from_array(scales, base + "_scales"))
        new_nodes.append(helper.make_node(
            "MatMulNBits", [node.input[0], base + "_B", base + "_scales"], list(node.output),
            name=node.name + "_q4_0", domain="com.microsoft",
            K=k_in, N=n_out, bits=4, block_size=Q4_BLOCK))
        done.append({"node": node.name, "weight": src, "K": int(k_in), "N": int(n_out),
                     "rmse": float(np.sqrt(np.mean(err.astype(np.float64) ** 2))),
                     "max_abs_err": float(np.abs(err).max())})
        del packed, scales, deq, err, w_nk
    if done:
        del g.node[:]
        g.node.extend(new_nodes)
    _drop_unused(g)
    if done and not any(o.domain == "com.microsoft" for o in m.opset_import):
        m.opset_import.append(helper.make_opsetid("com.microsoft", 1))
    if log:
        log(f"quantize_q4_0: {len(done)} MatMul -> MatMulNBits")
    return done


def _constant_weight(node, inits, producers):
    """(name, W [N, K] f32) of a MatMul's constant second input: an initializer W^T [K, N], or
    Transpose(perm=[1, 0]) of an initializer [N, K]; (None, None) for anything else."""
    from onnx import numpy_helper

    b = node.input[1]
    if b in inits and len(inits[b].dims) == 2:
        return b, np.ascontiguousarray(numpy_helper.to_array(inits[b]).T)
    if b in producers and producers[b].op_type == "Transpose" and producers[b].input[0] in inits:
        t = producers[b]
        perm = [a.ints for a in t.attribute if a.name == "perm"]
        src = t.input[0]
        if len(inits[src].dims) == 2 and (not perm or list(perm[0]) == [1, 0]):
            return src, numpy_helper.to_array(inits[src])
    return None, None


def _drop_unused(g):
    """Drops what rewritten nodes left unused (transposes of weights, f32 weights), in place:
    rebuilding the repeated fields would copy every initializer."""
    while True:
        used = {x for n in g.node for x in n.input} | {o.name for o in g.output}
        dead = [i for i, n in enumerate(g.node) if not any(o in used for o in n.output)]
        if not dead:
            break
        for i in reversed(dead):
            del g.node[i]
    used = {x for n in g.node for x in n.input} | {o.name for o in g.output}
    for i in reversed(range(len(g.initializer))):
        if g.initializer[i].name not in used:
            del g.initializer[i]


Q8_0_DOMAIN = "ai.outpost"


def quantize_q8_0(m, select=None, log=print):
    """Rewrites, in the ModelProto `m` (in place), every MatMul with a constant weight (see
    `_constant_weight`) that `select(node, weight_name, K, N)` picks into an ai.outpost MatMulQ8_0
    node (daemon/src/model/block_matmul.rs): inputs A, B int8 [N, K], scales f16 [N, K/32]
    (llama.cpp's Q8_0: d = max|w| / 127 per block of 32 along K), attributes K and N.
    onnxruntime cannot run it: `runtime_twin` gives the graph it can. Returns a list of
    {node, weight, K, N, rmse, max_abs_err}."""
    from onnx import helper, numpy_helper

    g = m.graph
    inits = {i.name: i for i in g.initializer}
    producers = {o: n for n in g.node for o in n.output}
    done, new_nodes = [], []
    for node in g.node:
        src, w_nk = (None, None) if node.op_type != "MatMul" else _constant_weight(node, inits, producers)
        if w_nk is None or w_nk.dtype != np.float32 or w_nk.shape[1] % Q8_BLOCK:
            new_nodes.append(node)
            continue
        n_out, k_in = w_nk.shape
        if select is not None and not select(node, src, k_in, n_out):
            new_nodes.append(node)
            continue
        q, d = q8_0_pack(w_nk)
        err = (q.reshape(n_out, -1, Q8_BLOCK).astype(np.float32) * d.astype(np.float32)[..., None]).reshape(
            n_out, k_in) - w_nk
        base = f"{src}_q8_0"
        g.initializer.append(numpy_helper.from_array(q, base + "_B"))
        g.initializer.append(numpy_helper.from_array(d, base + "_scales"))
        new_nodes.append(helper.make_node(
            "MatMulQ8_0", [node.input[0], base + "_B", base + "_scales"], list(node.output),
            name=node.name + "_q8_0", domain=Q8_0_DOMAIN, K=k_in, N=n_out))
        done.append({"node": node.name, "weight": src, "K": int(k_in), "N": int(n_out),
                     "rmse": float(np.sqrt(np.mean(err.astype(np.float64) ** 2))),
                     "max_abs_err": float(np.abs(err).max())})
    if done:
        del g.node[:]
        g.node.extend(new_nodes)
        if not any(o.domain == Q8_0_DOMAIN for o in m.opset_import):
            m.opset_import.append(helper.make_opsetid(Q8_0_DOMAIN, 1))
    _drop_unused(g)
    if log:
        log(f"quantize_q8_0: {len(done)} MatMul -> MatMulQ8_0")
    return done


def fuse_block_siblings(m, log=print):
    """Merges, in the ModelProto `m` (in place), the block-quantized products that read the same
    input (a layer's q/k/v projections; its gate/up), `MatMulQ8_0` or Q4_0 `MatMulNBits`, into
    one node of the same kind over their rows stacked, followed by a Split along the last axis
    into the original outputs. Each output row is the same dot product as before, so the values
    do not change; the runtime then quantizes the input once and shares one larger product out
    among its threads instead of several small ones. Returns a list of {nodes, N} per merged
    group."""
    from onnx import helper, numpy_helper

    g = m.graph
    inits = {i.name: i for i in g.initializer}

    def attribute(node, name):
        return next((a.i for a in node.attribute if a.name == name), None)

    def mergeable(node):
        if node.op_type == "MatMulQ8_0" and node.domain == Q8_0_DOMAIN:
            return True
        # Q4_0 as quantize_q4_0 writes it: 4 bits, blocks of 32, no zero points, g_idx or bias.
        return (node.op_type == "MatMulNBits" and node.domain == "com.microsoft" and len(node.input) == 3
                and attribute(node, "bits") in (None, 4) and attribute(node, "block_size") == Q4_BLOCK)

    groups = {}
    for node in g.node:
        if mergeable(node):
            groups.setdefault((node.op_type, node.input[0]), []).append(node)
    groups = {key: nodes for key, nodes in groups.items() if len(nodes) > 1}
    merged, replacement = [], {}
    for (op, a), nodes in groups.items():
        k = {attribute(n, "K") for n in nodes}
        assert len(k) == 1, f"{op} nodes reading {a} disagree on K: {sorted(k)}"
        widths = [attribute(n, "N") for n in nodes]
        base = nodes[0].name + "_fused"
        # B ([N, K] int8 or [N, K / 32, 16] nibbles) and the scales ([N, K / 32] or flat, N major)
        # both stack along their first axis.
        for part, suffix in ((1, "_B"), (2, "_scales")):
            stacked = np.concatenate([numpy_helper.to_array(inits[n.input[part]]) for n in nodes], axis=0)
            g.initializer.append(numpy_helper.from_array(stacked, base + suffix))
        g.initializer.append(numpy_helper.from_array(np.asarray(widths, np.int64), base + "_widths"))
        fused = helper.make_node(op, [a, base + "_B", base + "_scales"], [base + "_out"], name=base,
                                 domain=nodes[0].domain)
        fused.attribute.extend(attr for attr in nodes[0].attribute if attr.name != "N")
        fused.attribute.append(helper.make_attribute("N", sum(widths)))
        split = helper.make_node("Split", [base + "_out", base + "_widths"], [o for n in nodes for o in n.output],
                                 name=base + "_parts", axis=-1)
        # The merged pair goes where the first of the group was: every member reads only `a`,
        # which is produced before it, and their consumers all come after the first.
        replacement[nodes[0].output[0]] = [fused, split]
        for n in nodes[1:]:
            replacement[n.output[0]] = []
        merged.append({"nodes": [n.name for n in nodes], "N": int(sum(widths))})
    if merged:
        new_nodes = [r for n in g.node for r in replacement.get(n.output[0], [n])]
        del g.node[:]
        g.node.extend(new_nodes)
        _drop_unused(g)
    if log:
        log(f"fuse_block_siblings: {sum(len(x['nodes']) for x in merged)} products -> {len(merged)}")
    return merged


def runtime_twin(m):
    """A copy of `m` that onnxruntime runs as the runtime computes it: every MatMulQ8_0 node back
    as a MatMul with its weight dequantized to f32 (the same values), and the activations of it
    and of every MatMulNBits rounded as the runtime's kernels round them (`q8_0_activations`)."""
    import copy

    from onnx import helper, numpy_helper

    m = copy.deepcopy(m)
    g = m.graph
    inits = {i.name: i for i in g.initializer}
    dequantized = set()
    for index, node in enumerate(list(g.node)):
        if node.op_type != "MatMulQ8_0":
            continue
        q = numpy_helper.to_array(inits[node.input[1]])
        d = numpy_helper.to_array(inits[node.input[2]]).astype(np.float32)
        n_out, k_in = q.shape
        w = (q.reshape(n_out, -1, Q8_BLOCK).astype(np.float32) * d[..., None]).reshape(n_out, k_in)
        name = node.input[1] + "_dequantized_t"
        g.initializer.append(numpy_helper.from_array(np.ascontiguousarray(w.T), name))
        g.node[index].CopyFrom(helper.make_node("MatMul", [node.input[0], name], list(node.output), name=node.name))
        dequantized.add(node.output[0])
    _drop_unused(g)
    for i in reversed(range(len(m.opset_import))):
        if m.opset_import[i].domain == Q8_0_DOMAIN:
            del m.opset_import[i]
    q8_0_activations(m, lambda n: n.output[0] in dequantized or n.op_type == "MatMulNBits")
    return m


def q8_0_activations(m, chosen):
    """In `m` (in place), the first input of every node `chosen(node)` rounded as the runtime's
    block products round activations (`output_layer_logits` says how): per row and block of 32,
    d = max|x| / 127, q = x * (1 / d) rounded (halves to even), clipped to +-127, then q * d.
    With it onnxruntime's float products are the runtime's integer ones up to f32 summation."""
    from onnx import helper, numpy_helper

    g = m.graph
    consts = {"blocks": np.array([0, -1, Q8_BLOCK], np.int64), "last": np.array([-1], np.int64),
              "d127": np.array(127.0, np.float32), "zero": np.array(0.0, np.float32),
              "lo": np.array(-127.0, np.float32), "hi": np.array(127.0, np.float32)}
    names = {key: f"q8_0_activations_{key}" for key in consts}
    nodes = []
    done = 0
    for node in g.node:
        if chosen(node):
            x, p = node.input[0], f"{node.name or node.output[0]}_q8_0_x"
            nodes += [
                helper.make_node("Shape", [x], [p + "_shape"]),
                # [.., K] -> [rows, K / 32, 32]: Reshape's 0 keeps the first dim, -1 takes the rest.
                helper.make_node("Reshape", [x, names["blocks"]], [p + "_blocks"]),
                helper.make_node("Abs", [p + "_blocks"], [p + "_abs"]),
                helper.make_node("ReduceMax", [p + "_abs", names["last"]], [p + "_max"], keepdims=1),
                helper.make_node("Div", [p + "_max", names["d127"]], [p + "_d"]),
                helper.make_node("Equal", [p + "_d", names["zero"]], [p + "_is_zero"]),
                helper.make_node("Reciprocal", [p + "_d"], [p + "_reciprocal"]),
                helper.make_node("Where", [p + "_is_zero", names["zero"], p + "_reciprocal"], [p + "_inverse"]),
                helper.make_node("Mul", [p + "_blocks", p + "_inverse"], [p + "_scaled"]),
                helper.make_node("Round", [p + "_scaled"], [p + "_rounded"]),
                helper.make_node("Clip", [p + "_rounded", names["lo"], names["hi"]], [p + "_q"]),
                helper.make_node("Mul", [p + "_q", p + "_d"], [p + "_dequantized"]),
                helper.make_node("Reshape", [p + "_dequantized", p + "_shape"], [p]),
            ]
            node.input[0] = p
            done += 1
        nodes.append(node)
    if done:
        del g.node[:]
        g.node.extend(nodes)
        g.initializer.extend(numpy_helper.from_array(value, names[key]) for key, value in consts.items())
    return done


def activation_importance(m, feeds, names=None):
    """Mean squared activation per channel of the first input of every MatMul with a constant
    2-D weight (or of `names`), over all positions of all `feeds` (onnxruntime runs of the
    ModelProto `m` with those tensors exposed as outputs): llama.cpp's importance matrix."""
    import onnxruntime as ort
    from onnx import helper

    inits = {i.name for i in m.graph.initializer}
    if names is None:
        names = sorted({n.input[0] for n in m.graph.node if n.op_type == "MatMul" and n.input[1] in inits})
    probe = type(m)()
    probe.CopyFrom(m)
    have = {o.name for o in probe.graph.output}
    for x in names:
        if x not in have:
            probe.graph.output.append(helper.make_empty_tensor_value_info(x))
    so = ort.SessionOptions()
    so.log_severity_level = 3
    so.intra_op_num_threads = 2
    sess = ort.InferenceSession(probe.SerializeToString(), so, providers=["CPUExecutionProvider"])
    del probe
    sums, count = {}, 0
    for feed in feeds:
        outs = dict(zip([o.name for o in sess.get_outputs()], sess.run(None, feed)))
        for x in names:
            a = outs[x].reshape(-1, outs[x].shape[-1]).astype(np.float64)
            sums[x] = sums.get(x, 0) + (a * a).sum(0)
        count += a.shape[0]
    return {x: (v / count).astype(np.float32) for x, v in sums.items()}


# ----------------------------------------------------------------------------------------------
# Q8_0 embedding tables (tract has no Q8_0 matmul, but a Gather of int8 rows is plain ONNX)
# ----------------------------------------------------------------------------------------------

Q8_BLOCK = 32


def q8_0_pack(table: np.ndarray):
    """llama.cpp Q8_0 of a [V, H] table: per block of 32 values along H, d = max|x| / 127 stored
    as f16 and q = round(x / d) as int8. Returns (q int8 [V, H], d f16 [V, H/32])."""
    v, h = table.shape
    x = table.reshape(v, h // Q8_BLOCK, Q8_BLOCK).astype(np.float32)
    d16 = (np.abs(x).max(-1) / np.float32(127.0)).astype(np.float16)
    d = d16.astype(np.float32)
    q = np.clip(np.round(x / np.where(d == 0, np.float32(1.0), d)[..., None]), -127, 127).astype(np.int8)
    return q.reshape(v, h), d16


def q8_0_recover(table: np.ndarray):
    """The GGUF's token_embd is Q8_0 (int8 q, one f16 scale d per 32 values, w = f32(q) * f32(d),
    exact in f32): recover (q int8 [V, H], d f16 [V, H/32]) from the dequantized f32 table, or
    None when the table is not exactly of that form."""
    v, h = table.shape
    if h % Q8_BLOCK:
        return None
    q, d = q8_0_pack(table)
    dequantized = q.reshape(v, h // Q8_BLOCK, Q8_BLOCK).astype(np.float32) * d.astype(np.float32)[..., None]
    return (q, d) if np.array_equal(dequantized.reshape(v, h), table) else None



# ----------------------------------------------------------------------------------------------
# the output layer outside the decoder graph (daemon/src/model/output_layer.rs)
# ----------------------------------------------------------------------------------------------

OUTPUT_LAYER_FILE = "output_layer.q8_0"
# The output layer's file in each format the runtime reads (text.output_layer.format).
OUTPUT_LAYER_FILES = {"q8_0": OUTPUT_LAYER_FILE, "q4_0": "output_layer.q4_0"}
Q8_0_BLOCK = np.dtype([("d", "<f2"), ("q", "i1", (Q8_BLOCK,))])  # GGML's block_q8_0, 34 bytes
Q4_0_BLOCK = np.dtype([("d", "<f2"), ("qs", "u1", (Q4_BLOCK // 2,))])  # GGML's block_q4_0, 18 bytes
SOFTCAP_OPS = {"Div", "Tanh", "Mul"}


def split_output_layer(m, is_head, hidden: int):
    """Cuts the output matmul off a decoder graph, with what follows it to the `logits` output (a
    soft-cap: Div, Tanh, Mul): the graph then gives `hidden_states` [1, seq, hidden], the final
    norm's output, and the runtime's output layer makes the logits. `is_head(name, initializer)`
    picks the matmul's constant weight [hidden, V]. Returns that weight as f32 [V, hidden]."""
    from onnx import TensorProto, helper, numpy_helper

    inits = {i.name: i for i in m.graph.initializer}
    (head,) = [n for n in m.graph.node if n.op_type == "MatMul" and n.input[1] in inits
               and is_head(n.input[1], inits[n.input[1]])]
    after, reached = [], {head.output[0]}
    for node in m.graph.node:
        if node is not head and any(i in reached for i in node.input):
            after.append(node)
            reached.update(node.output)
    outputs = [o.name for o in m.graph.output]
    assert outputs[0] in reached and not set(outputs[1:]) & reached, "the output matmul does not feed `logits` alone"
    assert {n.op_type for n in after} <= SOFTCAP_OPS, f"unexpected ops after the output matmul: {after}"
    table = numpy_helper.to_array(inits[head.input[1]]).T.copy()
    index = list(m.graph.node).index(head)
    for node in [head, *after]:
        m.graph.node.remove(node)
    m.graph.node.insert(index, helper.make_node("Identity", [head.input[0]], ["hidden_states"], name="hidden_states"))
    if not any(head.input[1] in n.input for n in m.graph.node):
        m.graph.initializer.remove(inits[head.input[1]])
    m.graph.output[0].CopyFrom(helper.make_tensor_value_info("hidden_states", TensorProto.FLOAT, [1, "seq", hidden]))
    return table


def write_q8_0_blocks(path: Path, table: np.ndarray):
    """The [V, H] output matrix as GGML Q8_0 blocks, row by row (what the runtime's output layer
    reads). Exact when the table already is Q8_0 (Gemma's tied GGUF table); returns whether."""
    v, h = table.shape
    recovered = q8_0_recover(table)
    q, d = recovered if recovered is not None else q8_0_pack(table)
    blocks = np.empty((v, h // Q8_BLOCK), Q8_0_BLOCK)
    blocks["d"] = d
    blocks["q"] = q.reshape(v, h // Q8_BLOCK, Q8_BLOCK)
    blocks.tofile(path)
    return recovered is not None


def read_q8_0_blocks(path: Path, hidden: int):
    """(q int8 [V, hidden], d f32 [V, hidden/32]) of a file written by write_q8_0_blocks."""
    blocks = np.fromfile(path, Q8_0_BLOCK).reshape(-1, hidden // Q8_BLOCK)
    return blocks["q"].reshape(-1, hidden), blocks["d"].astype(np.float32)


def q4_0_blocks(rows: np.ndarray, search: bool = False) -> np.ndarray:
    """GGML Q4_0 blocks of `rows` [N, K] with the values of q4_0_pack (`search` as there): per
    block the f16 scale, then value j in the low nibble of byte j and value j + 16 in its high
    nibble. uint8 [N, K/32 * 18]."""
    n, k = rows.shape
    packed, scales, _ = q4_0_pack(np.ascontiguousarray(rows, dtype=np.float32), search=search)
    q = np.empty(packed.shape[:-1] + (Q4_BLOCK,), np.uint8)
    q[..., 0::2] = packed & 0x0F
    q[..., 1::2] = packed >> 4
    qs = q[..., :Q4_BLOCK // 2] | (q[..., Q4_BLOCK // 2:] << 4)
    d = scales.astype(np.float16).reshape(n, k // Q4_BLOCK, 1).view(np.uint8)
    return np.concatenate([d, qs], axis=-1).reshape(n, -1)


def write_q4_0_blocks(path: Path, table: np.ndarray, rows_per_chunk: int = 16384):
    """The [V, H] output matrix as GGML Q4_0 blocks, row by row, a chunk of rows at a time (E2B's
    table is 1.6 GB in f32; q4_0_pack's temporaries are several times a chunk). The reference
    rounding, as gemma4_gguf.py stores the token table: on Gemma 3 270M (every layer Q4_0) a Q4_0
    output layer took the teacher-forced agreement with f32 from 0.79 to 0.708, and searching
    each block's scale (`search=True`) only to 0.7115."""
    with open(path, "wb") as f:
        for start in range(0, table.shape[0], rows_per_chunk):
            q4_0_blocks(table[start:start + rows_per_chunk]).tofile(f)


def read_q4_0_blocks(path: Path, hidden: int):
    """(q int8 [V, hidden] from -8 to 7, d f32 [V, hidden/32]) of a file of GGML Q4_0 blocks: the
    same form as read_q8_0_blocks gives, for q8_0_rows and output_layer_logits."""
    blocks = np.fromfile(path, Q4_0_BLOCK).reshape(-1, hidden // Q4_BLOCK)
    qs = blocks["qs"]
    q = np.concatenate([qs & 0x0F, qs >> 4], axis=-1).astype(np.int8) - np.int8(8)
    return q.reshape(-1, hidden), blocks["d"].astype(np.float32)


def read_blocks(path: Path, hidden: int, fmt: str):
    """read_q8_0_blocks or read_q4_0_blocks, by `fmt` ("q8_0" or "q4_0")."""
    return {"q8_0": read_q8_0_blocks, "q4_0": read_q4_0_blocks}[fmt](path, hidden)


def q8_0_rows(layer, ids, scale):
    """Rows `ids` of a Q8_0 table `layer` (q, d) times `scale`, in the runtime's f32 arithmetic
    (daemon/src/model/output_layer.rs, per_layer_embeddings.rs): (f32(q) * f32(d)) * f32(scale)."""
    q, d = layer
    rows = q[ids].astype(np.float32) * np.repeat(d[ids], Q8_BLOCK, axis=-1)
    return rows * np.float32(scale)


def output_layer_logits(hidden_states: np.ndarray, layer, softcap):
    """The logits the runtime's output layer computes, the same way: each hidden row quantized
    per block of 32 (d = max|x| / 127 in f32, q = x * (1 / d) rounded, halves to even), exact
    integer block products scaled by both blocks' scales, then the soft-cap."""
    q, d = layer
    v, h = q.shape
    x = hidden_states.reshape(-1, h // Q8_BLOCK, Q8_BLOCK).astype(np.float32)
    dx = np.abs(x).max(-1) / np.float32(127.0)
    inverse = np.where(dx == 0, np.float32(0.0), np.float32(1.0) / np.where(dx == 0, np.float32(1.0), dx))
    scaled = x * inverse[..., None]
    qx = np.clip(np.rint(scaled), -127, 127)
    # Block by block as float matmuls: the integer products and their sums of 32 (below 2^24) are
    # exact in f32.
    qw = q.reshape(v, h // Q8_BLOCK, Q8_BLOCK).astype(np.float32)
    logits = np.zeros((x.shape[0], v), np.float32)
    for b in range(h // Q8_BLOCK):
        logits += (qx[:, b, :].astype(np.float32) @ qw[:, b, :].T) * (dx[:, b, None] * d[None, :, b])
    if softcap is not None:
        logits = np.tanh(logits / np.float32(softcap)) * np.float32(softcap)
    return logits.reshape(*hidden_states.shape[:-1], v)


def q8_0_gather_nodes(q_name, d_name, ids, out, width, prefix):
    """Nodes (and their small shape constants) computing `out` = rows `ids` of the table stored
    as (q_name int8 [V, width], d_name f16 [V, width/32]): f32(q) * f32(d), as llama.cpp
    dequantizes Q8_0. Returns (nodes, initializers)."""
    from onnx import TensorProto, helper, numpy_helper

    F = TensorProto.FLOAT
    nb = width // Q8_BLOCK
    inits = [numpy_helper.from_array(np.array([1, -1, nb, Q8_BLOCK], np.int64), f"{prefix}_blocks_shape"),
             numpy_helper.from_array(np.array([1, -1, width], np.int64), f"{prefix}_rows_shape"),
             numpy_helper.from_array(np.array([3], np.int64), f"{prefix}_axis_3")]
    p = prefix
    nodes = [
        helper.make_node("Gather", [q_name, ids], [f"{p}_q"], name=f"{p}_gather_q", axis=0),
        helper.make_node("Cast", [f"{p}_q"], [f"{p}_q_f32"], name=f"{p}_cast_q", to=F),
        helper.make_node("Reshape", [f"{p}_q_f32", f"{p}_blocks_shape"], [f"{p}_q_blocks"], name=f"{p}_blocks"),
        helper.make_node("Gather", [d_name, ids], [f"{p}_d"], name=f"{p}_gather_d", axis=0),
        helper.make_node("Cast", [f"{p}_d"], [f"{p}_d_f32"], name=f"{p}_cast_d", to=F),
        helper.make_node("Unsqueeze", [f"{p}_d_f32", f"{p}_axis_3"], [f"{p}_d_blocks"], name=f"{p}_d_blocks"),
        helper.make_node("Mul", [f"{p}_q_blocks", f"{p}_d_blocks"], [f"{p}_w_blocks"], name=f"{p}_dequantize"),
        helper.make_node("Reshape", [f"{p}_w_blocks", f"{p}_rows_shape"], [out], name=f"{p}_rows"),
    ]
    return nodes, inits


def quantize_gather_q8_0(m, log=print):
    """Rewrites, in the ModelProto `m` (in place), every Gather of rows of a constant f32 table
    [V, H] with H a multiple of 32 and ids of shape [1, seq] into its Q8_0 form
    (`q8_0_gather_nodes`). Tables whose width is not a multiple of 32 stay f32. Returns a list of
    {table, rows, width, rmse, max_abs_err} for the tables rewritten."""
    from onnx import numpy_helper

    g = m.graph
    inits = {i.name: i for i in g.initializer}
    done, new_nodes = [], []
    for node in g.node:
        table = node.input[0] if node.op_type == "Gather" else None
        axis = [a.i for a in node.attribute if a.name == "axis"]
        if (table not in inits or len(inits[table].dims) != 2 or (axis and axis[0] != 0)
                or inits[table].data_type != 1 or inits[table].dims[1] % Q8_BLOCK):
            if table in inits and len(inits[table].dims) == 2 and inits[table].dims[1] % Q8_BLOCK:
                log(f"quantize_gather_q8_0: {table} {list(inits[table].dims)} stays f32 (width not a multiple of 32)")
            new_nodes.append(node)
            continue
        w = numpy_helper.to_array(inits[table])
        q, d = q8_0_pack(w)
        err = (q.reshape(*d.shape, Q8_BLOCK).astype(np.float32) * d.astype(np.float32)[..., None]).reshape(w.shape) - w
        prefix = node.name or table
        g.initializer.append(numpy_helper.from_array(q, table + "_q8_0"))
        g.initializer.append(numpy_helper.from_array(d, table + "_q8_0_scales"))
        nodes, consts = q8_0_gather_nodes(table + "_q8_0", table + "_q8_0_scales", node.input[1], node.output[0],
                                          w.shape[1], prefix)
        g.initializer.extend(consts)
        new_nodes.extend(nodes)
        done.append({"table": table, "rows": int(w.shape[0]), "width": int(w.shape[1]),
                     "rmse": float(np.sqrt(np.mean(err.astype(np.float64) ** 2))),
                     "max_abs_err": float(np.abs(err).max())})
        del w, q, d, err
    if done:
        del g.node[:]
        g.node.extend(new_nodes)
        used = {x for n in g.node for x in n.input}
        for i in reversed(range(len(g.initializer))):
            if g.initializer[i].name not in used:
                del g.initializer[i]
    if log:
        log(f"quantize_gather_q8_0: {len(done)} embedding tables -> Q8_0")
    return done
