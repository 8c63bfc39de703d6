"""The byte account of a compiled program (ssps_jax/bench/hlo_bytes.py): sizes, conventions, attribution.

The account of real compiled steps (CPU and TPU) is checked in test_aot.py, on the programs it compiles anyway.
"""

from ssps_jax.bench import hlo_bytes


def test_arrays_are_padded_to_their_memory_tiles():
    # (4096, 40) float32, dimension 0 minor, tiles of (8, 128): 40 rounds to 40, 4096 to 4096.
    assert hlo_bytes.array_bytes("f32", [4096, 40], "0,1:T(8,128)") == 4096 * 40 * 4
    # (16, 201, 40) with dimension 2 minor: 40 -> 128 lanes, 201 -> 208 sublanes.
    assert hlo_bytes.array_bytes("f32", [16, 201, 40], "2,1,0:T(8,128)") == 16 * 208 * 128 * 4
    assert hlo_bytes.array_bytes("f32", [16, 201, 40], "2,1,0:T(8,128)", padded=False) == 16 * 201 * 40 * 4
    assert hlo_bytes.array_bytes("bf16", [16, 201, 1024], "2,0,1:T(8,128)(2,1)") == 16 * 201 * 1024 * 2
    assert hlo_bytes.array_bytes("pred", [3, 5], "1,0") == 15  # no tiles (CPU): logical
    assert hlo_bytes.type_bytes("(f32[2,3]{1,0}, s32[4]{0}, u32[])") == 24 + 16 + 4


MODULE = """HloModule m

%fused_slice (param_0: f32[64,8], param_1: s32[]) -> f32[4,8] {
  %param_0 = f32[64,8]{1,0} parameter(0)
  %param_1 = s32[] parameter(1)
  %c = s32[] constant(0)
  ROOT %ds = f32[4,8]{1,0} dynamic-slice(%param_0, %param_1, %c), dynamic_slice_sizes={4,8}
}

ENTRY %main (p0: f32[64,8], p1: s32[], p2: f32[4,8]) -> f32[4,8] {
  %p0 = f32[64,8]{1,0} parameter(0), metadata={op_name="queue"}
  %p1 = s32[] parameter(1)
  %p2 = f32[4,8]{1,0} parameter(2)
  %cs = (f32[64,8]{1,0:S(1)}, f32[64,8]{1,0}, u32[]) copy-start(%p0)
  %cd = f32[64,8]{1,0:S(1)} copy-done(%cs)
  %rows = f32[4,8]{1,0} fusion(%cd, %p1), kind=kLoop, calls=%fused_slice, metadata={op_name="FORWARD/gather"}
  %sum = f32[4,8]{1,0} add(%rows, %p2), metadata={op_name="BACKWARD/add"}
  %ev = (f32[4,8]{1,0}, f32[4,8]{1,0:S(1)}, u32[]) copy-start(%sum)
  ROOT %out = f32[4,8]{1,0} copy-done(%ev)
}
"""
MODULE = MODULE.replace("FORWARD", "jit(step)/jvp(Net)/encoder/blocks_1")
MODULE = MODULE.replace("BACKWARD", "jit(step)/transpose(jvp(Net))/encoder/mfa")


def test_conventions_and_attribution_of_a_handwritten_module():
    computations, _ = hlo_bytes.parse(MODULE)
    types = {i.name: i.type for c in computations.values() for i in c.instructions}
    by_name = {i.name: i for i in hlo_bytes.top_level(computations)}
    assert set(by_name) == {"p0", "p1", "p2", "cs", "cd", "rows", "sum", "ev", "out"}  # not the fused ones

    def moved(name):
        return hlo_bytes.instruction_bytes(by_name[name], types, computations)

    queue, rows = 64 * 8 * 4, 4 * 8 * 4
    assert moved("p0") == moved("p1") == 0
    assert moved("cs") == queue + (2 * queue + 4)  # reads the queue, writes (destination, source, context)
    assert moved("cd") == 4 + queue  # reads the context, writes the destination
    assert moved("rows") == rows + 4 + rows  # only the dynamic slice of the queue is read
    assert moved("sum") == 3 * rows

    # In device memory only (not the on-chip S(1)): a copy counts once, its on-chip side not at all.
    def in_hbm(name):
        return hlo_bytes.instruction_bytes(by_name[name], types, computations, hbm_only=True)

    assert [in_hbm(n) for n in ("cs", "cd", "rows", "ev", "out")] == [queue, 0, 4 + rows, 2 * rows, 0]

    ops = {op.name: op for op in hlo_bytes.account(MODULE)}
    assert (ops["rows"].pass_, ops["rows"].path, ops["rows"].category) == ("forward", "encoder/blocks_1", "blocks_1")
    assert (ops["sum"].pass_, ops["sum"].category) == ("backward", "mfa")
    # A prefetch into on-chip memory (S(1)) belongs to what reads it; an eviction to what wrote the data.
    assert ops["cs"].category == ops["cd"].category == "blocks_1"
    assert ops["ev"].category == ops["out"].category == "mfa"
