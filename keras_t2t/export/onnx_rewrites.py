"""Rewrites of the ONNX graph that tf2onnx writes, into the forms that ONNX Runtime's and
OpenVINO's fusion passes match: a LayerNorm as one LayerNormalization node, the exact GELU
as `erf(x / sqrt(2))`; and the constants no node reads any more, dropped."""

import numpy as np
import onnx
from onnx import helper, numpy_helper


class _OnnxGraph:
    """Producers, consumers and constant values of an ONNX GraphProto, for the rewrites below."""

    def __init__(self, graph):
        self.graph = graph
        self.producer = {out: node for node in graph.node for out in node.output}
        self.consumers = {}
        for node in graph.node:
            for name in node.input:
                self.consumers.setdefault(name, []).append(node)
        # Constant tensors by name, read as arrays only when asked: the weights are most of them.
        self._tensors = {t.name: t for t in graph.initializer}
        for node in graph.node:
            if node.op_type == "Constant" and node.attribute[0].name == "value":
                self._tensors[node.output[0]] = node.attribute[0].t
        self.outputs = {value.name for value in graph.output}

    def is_constant(self, name):
        return name in self._tensors

    def constant(self, name):
        """The value of the constant `name` as an array, else None."""
        tensor = self._tensors.get(name)
        return None if tensor is None else numpy_helper.to_array(tensor)

    def node(self, name, op_type):
        """The node of type `op_type` (one of them, if a tuple) that produces `name`, else None."""
        node = self.producer.get(name)
        types = op_type if isinstance(op_type, tuple) else (op_type,)
        return node if node is not None and node.op_type in types else None

    def only_use(self, name):
        """The single node that reads `name`, else None (a graph output has other readers)."""
        users = self.consumers.get(name, [])
        return users[0] if len(users) == 1 and name not in self.outputs else None

    def other_input(self, node, name):
        """The input of a two-input `node` that is not `name`."""
        a, b = node.input
        return b if a == name else a if b == name else None


def _last_axis_mean(g, name, rank):
    """The input of the node producing `name` if it is a mean over the last axis of a rank-`rank`
    tensor (tf2onnx writes a last-axis ReduceMean of a rank-3 tensor as GlobalAveragePool)."""
    node = g.node(name, ("GlobalAveragePool", "ReduceMean"))
    if node is None:
        return None
    if node.op_type == "GlobalAveragePool":
        return node.input[0] if rank == 3 else None
    attributes = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    axes = attributes.get("axes")
    if axes is None and len(node.input) > 1:
        axes = g.constant(node.input[1])
    axes = None if axes is None else [int(a) % rank for a in np.ravel(axes)]
    return node.input[0] if axes == [rank - 1] and attributes.get("keepdims", 1) else None


def fuse_layer_norms(proto):
    """Replaces each LayerNorm written out in elementary ops (mean, subtract, square, mean, add
    epsilon, sqrt, divide, scale, offset: what tf2onnx makes of `keras_t2t.layers.LayerNorm`)
    with one ONNX LayerNormalization node (opset 17), which ONNX Runtime
    runs as one kernel and OpenVINO reads as MVN. Returns the number replaced."""
    inferred = onnx.shape_inference.infer_shapes(proto)
    ranks = {
        v.name: len(v.type.tensor_type.shape.dim)
        for v in [*inferred.graph.value_info, *inferred.graph.input, *inferred.graph.output]
        if v.type.tensor_type.HasField("shape")
    }
    g = _OnnxGraph(proto.graph)
    replaced, dropped = {}, set()
    for div in [n for n in proto.graph.node if n.op_type == "Div"]:
        centered, root = div.input
        sqrt = g.node(root, "Sqrt")
        add_eps = sqrt and g.node(sqrt.input[0], "Add")
        sub = g.node(centered, "Sub")
        if not (add_eps and sub) or sub.input[0] not in ranks:
            continue
        x, rank = sub.input[0], ranks[sub.input[0]]
        variance = next((i for i in add_eps.input if not g.is_constant(i)), None)
        epsilon = next((g.constant(i) for i in add_eps.input if g.is_constant(i)), None)
        if variance is None or epsilon is None or np.size(epsilon) != 1:
            continue
        square = g.node(_last_axis_mean(g, variance, rank), ("Mul", "Pow"))
        if square is None or square.input[0] != centered:
            continue
        if square.op_type == "Mul" and square.input[1] != centered:
            continue
        if square.op_type == "Pow" and g.constant(square.input[1]) != 2:
            continue
        if _last_axis_mean(g, sub.input[1], rank) != x:
            continue
        scale = g.only_use(div.output[0])
        offset = scale is not None and scale.op_type == "Mul" and g.only_use(scale.output[0])
        if not offset or offset.op_type != "Add":
            continue
        gamma = g.other_input(scale, div.output[0])
        beta = g.other_input(offset, scale.output[0])
        if not (g.is_constant(gamma) and g.is_constant(beta)):
            continue
        gamma_shape, beta_shape = np.shape(g.constant(gamma)), np.shape(g.constant(beta))
        if gamma_shape != beta_shape or len(gamma_shape) != 1:
            continue
        readers = {  # each intermediate value and the nodes of the pattern that read it
            sub.input[1]: [sub],
            centered: [square, div],
            square.output[0]: [g.producer[variance]],
            variance: [add_eps],
            add_eps.output[0]: [sqrt],
            sqrt.output[0]: [div],
        }
        if any(
            {n.output[0] for n in g.consumers.get(name, [])} != {n.output[0] for n in nodes}
            or name in g.outputs
            for name, nodes in readers.items()
        ):
            continue  # an intermediate value is used elsewhere: leave this one as it is
        fused = helper.make_node(
            "LayerNormalization",
            [x, gamma, beta],
            [offset.output[0]],
            name=f"{div.name}/LayerNormalization",
            axis=-1,
            epsilon=float(epsilon),
        )
        # Nodes are named by their first output (unique in a graph).
        replaced[offset.output[0]] = fused
        mean = g.producer[sub.input[1]]
        for node in (mean, sub, square, g.producer[variance], add_eps, sqrt, div, scale):
            dropped.add(node.output[0])
    nodes = [replaced.get(n.output[0], n) for n in proto.graph.node if n.output[0] not in dropped]
    del proto.graph.node[:]
    proto.graph.node.extend(nodes)
    return len(replaced)


def gelu_divides_by_sqrt2(proto):
    """Rewrites `erf(x * (1 / sqrt(2)))` as `erf(x / sqrt(2))` (the exact GELU as TensorFlow's
    grappler leaves it, a multiply, into the form of ONNX Runtime's Gelu fusion, a divide).
    Returns the number rewritten."""
    g = _OnnxGraph(proto.graph)
    rewritten = 0
    for erf in [n for n in proto.graph.node if n.op_type == "Erf"]:
        mul = g.node(erf.input[0], "Mul")
        if mul is None or g.only_use(mul.output[0]) is not erf:
            continue
        const = next((i for i in mul.input if g.is_constant(i)), None)
        value = g.constant(const)
        if value is None or np.size(value) != 1 or abs(float(value) - 0.5**0.5) > 1e-6:
            continue
        root2 = numpy_helper.from_array(
            np.array(2.0**0.5, dtype=value.dtype).reshape(np.shape(value)),
            name=f"{mul.name}/sqrt2",
        )
        proto.graph.initializer.append(root2)
        mul.op_type = "Div"
        mul.input[:] = [g.other_input(mul, const), root2.name]
        rewritten += 1
    return rewritten


def drop_unused_initializers(graph):
    """Removes the initializers no node reads any more (the constants of rewritten nodes),
    which ONNX Runtime would otherwise warn about on every load."""

    def names(g):  # inputs read anywhere, subgraphs (If, Loop bodies) included
        for node in g.node:
            yield from node.input
            for attribute in node.attribute:
                for sub in [attribute.g, *attribute.graphs]:
                    yield from names(sub)

    used = set(names(graph)) | {value.name for value in graph.output}
    kept = [t for t in graph.initializer if t.name in used]
    del graph.initializer[:]
    graph.initializer.extend(kept)
