"""bench/scan_cost.py finds the scan's per-query loop in a SASS listing and counts it."""

from bench.scan_cost import ASSUMPTIONS, classify, loops, parse_sass, step_costs, step_loop

# The shape of a cuobjdump -sass listing: an outer loop with the tensor-core products and an
# inner loop with the softmax; encodings after the instruction are ignored.
SASS = """
        /*0000*/                   S2R R0, SR_TID.X ;                 /* 0x0000000000007919 */
        /*0010*/                   HGMMA.64x64x16.F32 R24, gdesc[UR4], RZ ; /* 0x00 */
        /*0020*/                   WARPGROUP.DEPBAR.LE gsb0, 0x0 ;    /* 0x00 */
        /*0030*/                   FMNMX R3, R2, R4, !PT ;            /* 0x00 */
        /*0040*/                   SHFL.BFLY PT, R5, R3, 0x1, 0x1f ;  /* 0x00 */
        /*0050*/                   BAR.SYNC.DEFER_BLOCKING 0x0 ;      /* 0x00 */
        /*0060*/                   MUFU.EX2 R6, R5 ;                  /* 0x00 */
        /*0070*/                   LDG.E R7, desc[UR6][R8.64] ;       /* 0x00 */
        /*0080*/              @!P0 BRA 0x30 ;                         /* 0x00 */
        /*0090*/                   MUFU.EX2 R9, R6 ;                  /* 0x00 */
        /*00a0*/               @P1 BRA 0x10 ;                         /* 0x00 */
        /*00b0*/                   EXIT ;                             /* 0x00 */
"""


def test_parse_and_loops():
    instrs = parse_sass(SASS)
    assert len(instrs) == 12
    assert instrs[1][:2] == (0x10, "HGMMA.64x64x16.F32")
    assert loops(instrs) == [(0x30, 0x80), (0x10, 0xA0)]


def test_step_loop_is_the_inner_softmax_loop():
    body = step_loop(parse_sass(SASS))
    assert [op.split(".")[0] for _, op, _ in body] == ["FMNMX", "SHFL", "BAR", "MUFU", "LDG", "BRA"]
    assert [classify(op) for _, op, _ in body] == ["alu", "shfl", "bar", "mufu", "ldg", "branch"]


def test_step_costs():
    body = step_loop(parse_sass(SASS))
    costs = step_costs(body, {"num_warps": 4, "BLOCK_L": 256})
    lat = ASSUMPTIONS["latency"]
    assert costs["loop_instructions"] == 6
    assert costs["step_cycles"] == (
        6,
        sum(lat[c] for c in ("alu", "shfl", "bar", "mufu", "ldg")) + lat["branch"],
    )
    assert costs["elementwise_instructions_per_lane"] == 1.0  # (1 ALU + 1 MUFU) / 2 lanes
    lo, hi = costs["round_cycles"]
    assert 0 < lo <= hi
