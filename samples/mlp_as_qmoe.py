"""Experiment: rewrite a bundle's packed MLPs into one ``com.microsoft::QMoE`` node each.

    python samples/mlp_as_qmoe.py BUNDLE OUT_BUNDLE
    python samples/decode_step_ab.py BUILDER_INT4 BUNDLE OUT_BUNDLE

A decoder MLP on the ``ort`` target is five nodes: ``MatMulNBits`` (gate and up packed),
``Split``, ``Sigmoid`` + ``Mul`` (SiLU), ``Mul``, ``MatMulNBits`` (down). ONNX Runtime's
``QMoE`` with one expert and ``k=1`` computes the same SwiGLU MLP in one node (the routing
weight of a single expert is softmax over one logit, i.e. 1), taking the same 4-bit blocks:
the gate/up rows interleaved (the CPU kernel supports ``swiglu_fusion=1`` only) and the same
scales. Fewer nodes per token might have meant a faster decode step; measured on SmolLM2 it
did not (see the README), so ``compile`` does not do this. Outputs are equal at accuracy
level 0; at level 4 both quantize activations to int8 but not identically.
"""

from __future__ import annotations

import argparse
import pathlib
import shutil

import numpy as np
import onnx_ir as ir


def _initializer(graph: ir.Graph, name: str, array: np.ndarray) -> ir.Value:
    value = ir.Value(name=name, const_value=ir.tensor(np.ascontiguousarray(array), name=name))
    graph.register_initializer(value)
    return value


def _router(graph: ir.Graph) -> ir.Value:
    """A ``[tokens, 1]`` float tensor (any finite values: one expert always gets weight 1)."""
    ids = next(v for v in graph.inputs if v.name == "input_ids")
    shape = _initializer(graph, "qmoe/router_shape", np.array([-1, 1], np.int64))
    cast = ir.Node("", "Cast", [ids], [ir.AttrInt64("to", ir.DataType.FLOAT)], name="qmoe/Cast")
    reshape = ir.Node("", "Reshape", [cast.outputs[0], shape], name="qmoe/Reshape")
    graph.insert_before(graph.node(0), [cast, reshape])
    return reshape.outputs[0]


def _mlp_nodes(split: ir.Node):
    """(gate/up MatMulNBits, nodes to remove, down MatMulNBits) of the MLP around ``split``."""
    packed = split.inputs[0].producer()
    gate, up = split.outputs
    silu_nodes = [use.node for use in gate.uses()]
    gated = next(use.node for use in up.uses())
    down = next(use.node for use in gated.outputs[0].uses())
    return packed, [down, gated, *silu_nodes, split, packed], down


def _qmoe(graph: ir.Graph, packed: ir.Node, down: ir.Node, router: ir.Value) -> ir.Node:
    rows = int(packed.attributes["N"].value)
    inter, hidden = rows // 2, int(packed.attributes["K"].value)
    interleave = np.stack([np.arange(inter), np.arange(inter) + inter], 1).reshape(-1)
    stem = packed.inputs[1].name.removesuffix(".qweight")
    fc1 = packed.inputs[1].const_value.numpy().reshape(rows, -1)[interleave]
    fc1_scales = packed.inputs[2].const_value.numpy().reshape(rows, -1)[interleave]
    fc2 = down.inputs[1].const_value.numpy().reshape(hidden, -1)
    fc2_scales = down.inputs[2].const_value.numpy().reshape(hidden, -1)
    inputs = [packed.inputs[0], router,
              _initializer(graph, stem + ".fc1", fc1[None]),
              _initializer(graph, stem + ".fc1_scales", fc1_scales[None]), None,
              _initializer(graph, stem + ".fc2", fc2[None]),
              _initializer(graph, stem + ".fc2_scales", fc2_scales[None])]
    level = packed.attributes.get("accuracy_level")
    attributes = [ir.AttrInt64("k", 1), ir.AttrString("activation_type", "swiglu"),
                  ir.AttrInt64("swiglu_fusion", 1), ir.AttrFloat32("activation_alpha", 1.0),
                  ir.AttrFloat32("activation_beta", 0.0),
                  ir.AttrInt64("expert_weight_bits", int(packed.attributes["bits"].value)),
                  ir.AttrInt64("block_size", int(packed.attributes["block_size"].value)),
                  ir.AttrInt64("accuracy_level", int(level.value) if level else 0),
                  ir.AttrInt64("normalize_routing_weights", 1)]
    return ir.Node("com.microsoft", "QMoE", inputs, attributes, name=stem + "/QMoE")


def rewrite(model: ir.Model) -> int:
    """Replace every packed gate/up MLP by a QMoE node; returns how many."""
    graph = model.graph
    splits = [n for n in graph if n.op_type == "Split" and "gate_proj+up_proj" in n.name]
    router = _router(graph) if splits else None
    for split in splits:
        packed, removed, down = _mlp_nodes(split)
        node = _qmoe(graph, packed, down, router)
        graph.insert_before(packed, node)
        node.outputs[0].shape, node.outputs[0].type = down.outputs[0].shape, down.outputs[0].type
        ir.convenience.replace_all_uses_with(down.outputs[0], node.outputs[0])
        graph.remove(removed, safe=True)
    for name in [n for n, v in graph.initializers.items() if not list(v.uses())]:
        del graph.initializers[name]
    return len(splits)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("bundle", type=pathlib.Path)
    parser.add_argument("out", type=pathlib.Path)
    args = parser.parse_args()
    model = ir.load(args.bundle / "model.onnx")
    count = rewrite(model)
    if not count:
        raise SystemExit(f"{args.bundle} has no packed gate/up MLP (an ort-target w4 bundle has)")
    args.out.mkdir(parents=True, exist_ok=False)
    for path in args.bundle.iterdir():
        if path.name != "model.onnx" and not path.name.endswith(".data") and path.is_file():
            shutil.copy(path, args.out)
    ir.save(model, args.out / "model.onnx", external_data="model.onnx.data")
    print(f"{count} MLPs -> QMoE: {args.out}")


if __name__ == "__main__":
    main()
