"""Where a compiled program's bytes go: its HLO's top-level ops, each with the bytes it moves and the code that made it.

XLA's cost analysis gives one figure per program ("bytes accessed"); this
module splits it. It reads the optimised HLO text of a compiled program
(`compiled.as_text()`) and, for every instruction XLA executes at top level
(the entry computation and the bodies of its loops, conditionals and calls;
never the instructions inside a fusion, which run in registers / on-chip
memory), counts

  bytes = the bytes of its operands + the bytes of its result,

as XLA's HloCostAnalysis does, with its conventions:
  * instructions that move nothing count 0: parameter, constant,
    get-tuple-element, tuple, bitcast, after-all, and the "-done" half of an
    asynchronous pair (copy-start / copy-done count once, at the start);
  * a fusion's operand that the fused computation only slices (slice,
    dynamic-slice, gather) counts the bytes of the slices, not of the
    whole operand; a fusion whose root is a dynamic-update-slice of an
    operand (an in-place update) counts the update, not the buffer;
  * arrays count their bytes as laid out on the device: on a TPU each array
    is padded to its memory tiles (`{...:T(8,128)(2,1)}`: an (n, 40) array
    in (8, 128) tiles takes 128 / 40 = 3.2 x its logical bytes), which is
    what HBM traffic pays; `logical` in the account is the unpadded figure.
The sum of every instruction's bytes is compared with XLA's own total
(`Account.xla_bytes`); on libtpu 0.0.42 and the CPU backend they agree
within a few percent (the residue: ops whose operand reads XLA's TPU cost
model discounts, such as broadcasts), which the account states.

Attribution. Each instruction carries `metadata={op_name=...}`: the path of
the JAX primitive that made it through the transformations and the Flax
modules (`jit(simclr_step)/shard_map/transpose(jvp(SimCLR))/encoder/
blocks_2/res2net_block/blocks_3/conv/conv/conv_general_dilated`). A fusion
is attributed to the op_name of its fused computation's root (the op
whose result it writes; for a multi-output fusion, its first output), which
XLA copies onto the fusion itself. From the op_name:
  * the pass: "backward" inside `transpose(...)`, "forward" inside `jvp(...)`
    (the trained forward, whose residuals the backward reads), "inference"
    elsewhere under a model (the y^ forward of the reference crop, DINO's
    teacher), "step" for what no model made (loss, SSPS, optimizer);
  * the place: the Flax module path (`encoder/blocks_2/res2net_block`),
    or, for ops outside every module, the named scope (`log_mel`, `nt_xent`)
    or else the source file that made it (optax: the optimizer; ssps_jax/ssps:
    SSPS), from the module's stack-frame table.
`group_key(depth)` cuts the module path at `depth` names after the encoder,
so the account can be read per block (depth 1: `blocks_2`) or per layer
(depth 3). The figures are per device, like XLA's.
"""

from __future__ import annotations

import collections
import dataclasses
import math
import re

# Instructions that move no data (views, bookkeeping) and the second half of asynchronous pairs.
_FREE = {
    "parameter",
    "constant",
    "get-tuple-element",
    "tuple",
    "bitcast",
    "after-all",
    "partition-id",
    "replica-id",
    "iota",
    "opt-barrier",
    "add-dependency",
    # Control flow: the loop state and branch operands stay where they are; the ops of the bodies are counted.
    "while",
    "conditional",
    "call",
}
_SLICING = {"slice", "dynamic-slice", "gather"}
_DTYPE_BITS = {"pred": 8, "bf16": 16, "f8e4m3fn": 8, "f8e5m2": 8, "token": 0}
_ARRAY = re.compile(
    r"\b(?P<dtype>pred|token|bf16|f8e4m3fn|f8e5m2|[sufc]\d+)\[(?P<dims>[\d,]*)\](?:\{(?P<layout>[^}]*)\})?"
)
_HEADER = re.compile(r"^(?P<entry>ENTRY )?%(?P<name>[\w.\-]+) \(.*\) -> .*\{\s*$")
_INSTRUCTION = re.compile(r"^\s*(?P<root>ROOT )?%(?P<name>[\w.\-]+) = ")
_OPERAND = re.compile(r"%(?P<name>[\w.\-]+)")
_CALLS = re.compile(r"\b(?:calls|to_apply|body|condition)=%(?P<name>[\w.\-]+)")
_BRANCHES = re.compile(r"\bbranch_computations=\{(?P<names>[^}]*)\}")
_OP_NAME = re.compile(r'op_name="(?P<op_name>[^"]*)"')
_FRAME = re.compile(r"stack_frame_id=(?P<id>\d+)")


def array_bytes(dtype: str, dims: list[int], layout: str | None = None, padded: bool = True) -> int:
    """Bytes of one array; with `padded`, its dimensions rounded up to the first memory tile of its layout."""
    bits = _DTYPE_BITS[dtype] if dtype in _DTYPE_BITS else int(dtype[1:])
    if padded and layout and ":" in layout and dims:
        order, _, tiling = layout.partition(":")
        tile = re.match(r"T\((?P<t>[\d,]+)\)", tiling)
        if tile and order:
            minor_to_major = [int(d) for d in order.split(",") if d]
            tile_dims = [int(t) for t in tile["t"].split(",")]
            padded_dims = list(dims)
            # The tile covers the most minor dimensions: its last entry the most minor one.
            for t, axis in zip(reversed(tile_dims), minor_to_major):
                padded_dims[axis] = -(-dims[axis] // t) * t
            dims = padded_dims
    return math.prod(dims) * bits // 8


def type_bytes(text: str, padded: bool = True, hbm_only: bool = False) -> int:
    """Bytes of every array of an HLO type (an array or a tuple of them); with `hbm_only`, of those in device
    memory (memory space 0: not a TPU's on-chip VMEM, `S(1)`, nor its other spaces)."""
    return sum(
        array_bytes(m["dtype"], [int(d) for d in m["dims"].split(",") if d], m["layout"], padded)
        for m in _ARRAY.finditer(text)
        if not (hbm_only and re.search(r"S\([1-9]\d*\)", m["layout"] or ""))
    )


@dataclasses.dataclass
class Instruction:
    name: str
    opcode: str
    type: str  # the result type, as printed
    operands: list[str]
    calls: list[str]  # computations it calls (fused computation, loop body, ...)
    op_name: str
    frame: int | None  # stack frame id, for the source file
    root: bool
    parameter_number: int | None = None


@dataclasses.dataclass
class Computation:
    name: str
    entry: bool
    instructions: list[Instruction]

    @property
    def root(self) -> Instruction:
        return next((i for i in self.instructions if i.root), self.instructions[-1])


def _split_type(rest: str) -> tuple[str, str]:
    """(result type, text after it) of the right-hand side of an instruction."""
    if rest.startswith("("):
        depth = 0
        for i, ch in enumerate(rest):
            depth += {"(": 1, ")": -1}.get(ch, 0)
            if depth == 0:
                return rest[: i + 1], rest[i + 1 :].lstrip()
    head, _, tail = rest.partition(" ")
    return head, tail


def _parenthesised(text: str) -> tuple[str, str]:
    """(inside, after) of the parenthesised group `text` starts with."""
    depth = 0
    for i, ch in enumerate(text):
        depth += {"(": 1, ")": -1}.get(ch, 0)
        if depth == 0:
            return text[1:i], text[i + 1 :]
    return text[1:], ""


def parse(hlo: str) -> tuple[dict[str, Computation], dict[int, list[tuple[str, str]]]]:
    """The computations of an HLO module's text, and its stack frames: frame id -> [(file, function), ...],
    innermost call first."""
    computations, current, section = {}, None, None
    tables = {"FileNames": {}, "FunctionNames": {}, "FileLocations": {}, "StackFrames": {}}
    for line in hlo.splitlines():
        if line in tables:
            section = line
            continue
        if m := _HEADER.match(line):
            section = None
            current = Computation(m["name"], bool(m["entry"]), [])
            computations[current.name] = current
            continue
        if section:
            number, _, value = line.strip().partition(" ")
            if number.isdigit():
                tables[section][int(number)] = value
            continue
        if current is None or not (m := _INSTRUCTION.match(line)):
            continue
        result_type, rest = _split_type(line[m.end() :])
        opcode, _, rest = rest.partition("(")
        inside, attributes = _parenthesised("(" + rest)
        calls = [c["name"] for c in _CALLS.finditer(attributes)]
        for b in _BRANCHES.finditer(attributes):
            calls += [n.strip().lstrip("%") for n in b["names"].split(",") if n.strip()]
        op_name = _OP_NAME.search(attributes)
        frame = _FRAME.search(attributes)
        current.instructions.append(
            Instruction(
                name=m["name"],
                opcode=opcode.strip(),
                type=result_type,
                operands=[o["name"] for o in _OPERAND.finditer(inside)],
                calls=calls,
                op_name=op_name["op_name"] if op_name else "",
                frame=int(frame["id"]) if frame else None,
                root=bool(m["root"]),
                parameter_number=int(inside) if opcode.strip() == "parameter" and inside.strip().isdigit() else None,
            )
        )
    return computations, _stacks(tables)


def _stacks(tables: dict[str, dict[int, str]]) -> dict[int, list[tuple[str, str]]]:
    """frame id -> [(file, function), ...] from the module's FileNames / FunctionNames / FileLocations /
    StackFrames tables (innermost first)."""

    def field(text: str, key: str) -> int:
        m = re.search(key + r"=(\d+)", text)
        return int(m[1]) if m else 0

    def where(location: int) -> tuple[str, str]:
        text = tables["FileLocations"].get(location, "")
        file = tables["FileNames"].get(field(text, "file_name_id"), "").strip('"')
        function = tables["FunctionNames"].get(field(text, "function_name_id"), "").strip('"')
        return file, function

    stacks = {}
    for frame in tables["StackFrames"]:
        chain, seen, current = [], set(), frame
        while current and current not in seen:
            seen.add(current)
            text = tables["StackFrames"].get(current, "")
            chain.append(where(field(text, "file_location_id")))
            # Printed 1-based, as the proto's parent_frame_id: parent P is frame P - 1 (0: none).
            current = field(text, "parent_frame_id") - 1
        stacks[frame] = chain
    return stacks


def _fusion_operand_bytes(fused: Computation, index: int, full: int, padded: bool, hbm_only: bool = False) -> int:
    """Bytes a fusion reads of its operand `index`: the slices it takes, when it only slices it."""
    param = next((i for i in fused.instructions if i.opcode == "parameter" and i.parameter_number == index), None)
    if param is None:
        return full
    users = [i for i in fused.instructions if param.name in i.operands]
    if users and all(u.opcode in _SLICING and u.operands[0] == param.name for u in users):
        return min(full, sum(type_bytes(u.type, padded, hbm_only) for u in users))
    if users and all(u.opcode == "dynamic-update-slice" and u.operands[0] == param.name for u in users):
        return 0  # updated in place: the update is counted where it is read
    return full


def instruction_traffic(
    instruction: Instruction,
    types: dict[str, str],
    computations: dict[str, Computation],
    padded: bool = True,
    hbm_only: bool = False,
) -> dict[str, int]:
    """Bytes one top-level instruction moves, under the keys of XLA's cost analysis: "<operand>{}" for what it
    reads of each operand, "out{}" (or "out{<i>}" per output of a multi-output fusion) for what it writes."""
    if instruction.opcode in _FREE:
        return {}
    if instruction.opcode.endswith("-done"):
        # Reads the asynchronous context (the tuple's elements after (operands, result)), writes the result.
        context = _tuple_elements(types.get(instruction.operands[0], "()"))[2:] if instruction.operands else []
        if hbm_only:  # the copy is counted once, at its start
            return {}
        return {
            "0{}": sum(type_bytes(t, padded, hbm_only) for t in context),
            "out{}": type_bytes(instruction.type, padded, hbm_only),
        }
    if hbm_only and instruction.opcode == "copy-start":  # reads its source, writes its destination: once each
        destination = _tuple_elements(instruction.type)[0]
        return {
            "0{}": type_bytes(types.get(instruction.operands[0], ""), padded, True),
            "out{}": type_bytes(destination, padded, True),
        }
    if instruction.opcode == "slice-start":  # reads and writes its slice: ((source), slice, context)
        piece = type_bytes(_tuple_elements(instruction.type)[1], padded, hbm_only)
        return {"0{}": piece, "out{}": piece}
    fused = computations.get(instruction.calls[0]) if instruction.opcode == "fusion" and instruction.calls else None
    traffic = {}
    for index, operand in enumerate(instruction.operands):
        full = type_bytes(types.get(operand, ""), padded, hbm_only)
        traffic[f"{index}{{}}"] = _fusion_operand_bytes(fused, index, full, padded, hbm_only) if fused else full
    outputs = _tuple_elements(instruction.type) if instruction.type.startswith("(") else [instruction.type]
    roots = [fused.root] if fused is not None else []
    if fused is not None and fused.root.opcode == "tuple":
        by_name = {i.name: i for i in fused.instructions}
        roots = [by_name.get(o) for o in fused.root.operands]
    for index, element in enumerate(outputs):
        out = type_bytes(element, padded, hbm_only)
        root = roots[index] if index < len(roots) else None
        if root is not None and root.opcode == "dynamic-update-slice":  # in place: the update is written
            update = next((i for i in fused.instructions if i.name == root.operands[1]), None)
            out = type_bytes(update.type, padded, hbm_only) if update else out
        traffic["out{}" if len(outputs) == 1 and not instruction.type.startswith("(") else f"out{{{index}}}"] = out
    return traffic


def instruction_bytes(
    instruction: Instruction,
    types: dict[str, str],
    computations: dict[str, Computation],
    padded: bool = True,
    hbm_only: bool = False,
) -> int:
    return sum(instruction_traffic(instruction, types, computations, padded, hbm_only).values())


def _tuple_elements(text: str) -> list[str]:
    """The top-level elements of a tuple type `(a, (b, c), d)`."""
    inside, depth, start, out = text[1:-1], 0, 0, []
    for i, ch in enumerate(inside):
        depth += {"(": 1, ")": -1, "{": 1, "}": -1, "[": 1, "]": -1}.get(ch, 0)
        if ch == "," and depth == 0:
            out.append(inside[start:i].strip())
            start = i + 1
    out.append(inside[start:].strip())
    return out


def top_level(computations: dict[str, Computation]) -> list[Instruction]:
    """The instructions XLA runs as themselves: the entry computation's and, recursively, those of the
    loop bodies and conditions, conditional branches and calls it makes (not the inside of fusions)."""
    entry = next(c for c in computations.values() if c.entry)
    todo, seen, out = [entry], set(), []
    while todo:
        computation = todo.pop()
        if computation.name in seen:
            continue
        seen.add(computation.name)
        for instruction in computation.instructions:
            out.append(instruction)
            if instruction.opcode in ("while", "conditional", "call"):
                todo += [computations[n] for n in instruction.calls if n in computations]
    return out


# Where ops outside every Flax module come from, by the functions on their stack (innermost first).
_STACK_PLACES = (
    ("optimizer", ("optax/", "apply_gradients")),
    ("parameters' gather", ("ssps_jax/update_sharding.py",)),  # the split parameters gathered whole
    ("SSPS", ("ssps_jax/ssps/",)),
)
_PASSES = (("backward", "transpose("), ("forward", "jvp("))
# A method's loss functions (methods/*.py): nt_xent, dino_loss, moco_loss, aam_softmax, ...
_LOSS = re.compile(r"^\w+\.py:(?:nt_xent|\w*loss\w*|aam_softmax|\w*_softmax)$")


@dataclasses.dataclass(frozen=True)
class Op:
    """One top-level instruction of a compiled program and the bytes it moves."""

    name: str
    opcode: str
    shape: str  # its result type, memory layout left out
    bytes: int  # as laid out on the device (padded to memory tiles)
    logical_bytes: int
    hbm_bytes: int  # of arrays in device memory (on a TPU, not those in on-chip VMEM)
    pass_: str  # forward (trained, under jvp), backward (under transpose), inference, step
    path: str  # the Flax module path ("encoder/blocks_2/res2net_block/..."), or where outside the model
    category: str  # front end, blocks_N, BatchNorm, pooling, loss, SSPS, optimizer, ...
    op_name: str


def _module_path(op_name: str) -> tuple[str, str]:
    """(pass, module path) from an op_name: the components after the model's own, primitives dropped."""
    parts = op_name.split("/")
    pass_ = next((p for p, marker in _PASSES if marker in op_name), "")
    # The model's component: `jvp(SimCLR)`, `transpose(jvp(SimCLR))`, `SimCLR.embed`, `DINO.student`, `SimCLR`.
    start = next((i for i, p in enumerate(parts) if re.fullmatch(r"(?:\w+\()*[A-Z]\w*(?:\.\w+)?\)*", p)), None)
    if start is None:
        return pass_, ""
    # Submodules and named scopes; a model's own method calling another (DINO.student -> DINO) is left out.
    inner = [p for p in parts[start + 1 : -1] if re.fullmatch(r"[a-z_]\w*", p)]
    return pass_ or "inference", "/".join(inner)


def _stack_place(stack: list[tuple[str, str]]) -> str:
    for place, markers in _STACK_PLACES:
        if any(m in file or m == function for file, function in stack for m in markers):
            return place
    project = [(f, fn) for f, fn in stack if "ssps_jax/" in f]
    if project:
        file, function = project[0]
        return f"{file.rsplit('/', 1)[1]}:{function.split('.<locals>')[0]}"
    return ""


def _category(path: str, stack: list[tuple[str, str]], where: str) -> str:
    """front end / BatchNorm / <first module under the encoder> / pooling / loss / SSPS / optimizer / parameters'
    gather / other."""
    if where in ("optimizer", "parameters' gather", "SSPS"):
        return where
    if "log_mel" in path.split("/") or any(fn == "log_mel" for _, fn in stack):
        return "front end"
    # flax's nn.BatchNorm, or ours (models/layers.py: BatchNorm, with groups).
    if any("normalization.py" in f or fn.startswith("BatchNorm.") for f, fn in stack):
        return "BatchNorm"
    names = path.split("/")
    if names and names[0] == "encoder" and len(names) > 1:
        return names[1]
    if names and names[0]:
        return names[0]  # heads: projector, head, ...
    return "loss" if _LOSS.search(where) else (where or "other")


def _clean_shape(text: str) -> str:
    return re.sub(r"\{[^{}]*\}", "", text)


def account(hlo: str) -> list[Op]:
    """Every top-level instruction of a compiled program's HLO text that moves bytes, most bytes first."""
    computations, stacks = parse(hlo)
    types = {i.name: i.type for c in computations.values() for i in c.instructions}
    instructions = top_level(computations)
    # An instruction without metadata (XLA's copies, async starts) is attributed like its first user that has some.
    users = collections.defaultdict(list)
    for i in instructions:
        for operand in i.operands:
            users[operand].append(i)

    producers = {i.name: i for i in instructions}

    def prefetch(i: Instruction) -> bool:
        """A copy into on-chip memory (memory space S(1) on a TPU), or the end of one."""
        if i.opcode == "copy-done" and i.operands and i.operands[0] in producers:
            i = producers[i.operands[0]]
        # copy-start's result is (destination, source, context).
        return i.opcode == "copy-start" and "S(1)" in _tuple_elements(i.type)[0]

    def described(i: Instruction, depth: int = 0, seen=None) -> Instruction:
        """i, or the nearest instruction with metadata whose data it moves: its first user for a prefetch
        into on-chip memory (made for what reads it), else its producer through tuples and copies (an
        eviction to HBM or a layout change belongs to what made the data), else its first user."""
        seen = set() if seen is None else seen
        if i.op_name or depth > 8 or i.name in seen:
            return i
        seen.add(i.name)
        producing = [producers[o] for o in i.operands if o in producers and producers[o].opcode != "parameter"]
        using = users.get(i.name, [])
        for other in (using + producing) if prefetch(i) else (producing + using):
            found = described(other, depth + 1, seen)
            if found.op_name:
                return found
        return i

    ops = []
    for i in instructions:
        moved = instruction_bytes(i, types, computations)
        if not moved:
            continue
        source = described(i)
        stack = stacks.get(source.frame, []) if source.frame is not None else []
        pass_, path = _module_path(source.op_name)
        where = path or _stack_place(stack)
        ops.append(
            Op(
                name=i.name,
                opcode=i.opcode,
                shape=_clean_shape(i.type),
                bytes=moved,
                logical_bytes=instruction_bytes(i, types, computations, padded=False),
                hbm_bytes=instruction_bytes(i, types, computations, hbm_only=True),
                pass_=pass_ or "step",
                path=where,
                category=_category(path, stack, where),
                op_name=source.op_name,
            )
        )
    return sorted(ops, key=lambda o: -o.bytes)


def grouped(ops: list[Op], key) -> list[tuple[str, dict[str, int]]]:
    """(group, {pass: bytes, "total": bytes, "hbm": bytes in device memory}) of the ops by key(op), most first."""
    groups = collections.defaultdict(collections.Counter)
    for op in ops:
        groups[key(op)][op.pass_] += op.bytes
        groups[key(op)]["total"] += op.bytes
        groups[key(op)]["hbm"] += op.hbm_bytes
    return sorted(groups.items(), key=lambda kv: -kv[1]["total"])


def path_at(depth: int):
    """Group key: the op's module path cut to `depth` names after the encoder (or head)."""

    def key(op: Op) -> str:
        names = op.path.split("/")
        keep = depth + 1 if names[0] == "encoder" else depth
        return "/".join(names[:keep]) or op.category

    return key


PASS_COLUMNS = ("forward", "backward", "inference", "step")


def _gb(n: float) -> str:
    return f"{n / 1e9:.3f}"


def summary(ops: list[Op], top: int) -> dict:
    """The account as data (for JSON and `render`): the total, bytes by part and pass, the `top` ops."""
    return {
        "total": sum(op.bytes for op in ops),
        "hbm": sum(op.hbm_bytes for op in ops),
        "by_part": {group: dict(by_pass) for group, by_pass in grouped(ops, lambda op: op.category)},
        "top_ops": [dataclasses.asdict(op) for op in ops[:top]],
    }


def render(account: dict, xla_bytes: float | None = None) -> str:
    """A `summary` as markdown: bytes by part of the model and pass, then the ops that move the most."""
    total = account["total"]
    lines = [
        f"Bytes accessed per device, by part (GB): this account {_gb(total)}"
        + ("" if not xla_bytes else f", XLA's cost analysis {_gb(xla_bytes)} ({total / xla_bytes:.0%})")
        + f"; of arrays in device memory (HBM; the rest is a TPU's on-chip VMEM) {_gb(account['hbm'])}",
        "",
        "| part | " + " | ".join(PASS_COLUMNS) + " | total | share | in HBM |",
        "|" + " --- |" * (len(PASS_COLUMNS) + 4),
    ]
    for group, by_pass in account["by_part"].items():
        cells = [_gb(by_pass[p]) if by_pass.get(p) else "-" for p in PASS_COLUMNS]
        lines.append(
            f"| {group} | {' | '.join(cells)} | {_gb(by_pass['total'])} | {by_pass['total'] / total:.1%} "
            f"| {_gb(by_pass.get('hbm', 0))} |"
        )
    if account["top_ops"]:
        lines += [
            "",
            f"The {len(account['top_ops'])} ops that move the most:",
            "",
            "| MB | op | pass | where | result |",
            "| --- | --- | --- | --- | --- |",
        ]
        for op in account["top_ops"]:
            shape = op["shape"] if len(op["shape"]) <= 80 else op["shape"][:77] + "..."
            where = op["path"] or op["category"]
            lines.append(f"| {op['bytes'] / 1e6:.1f} | {op['opcode']} | {op['pass_']} | {where} | `{shape}` |")
    return "\n".join(lines)
