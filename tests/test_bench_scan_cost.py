"""bench/scan_cost.py finds the sequential scan's per-query loop in a SASS listing and counts
it, and counts the chunked scan's pieces from a line-annotated listing with the loops' trips."""

import pytest

from bench.scan_cost import (
    ASSUMPTIONS,
    chunk_costs,
    chunk_loops,
    classify,
    loops,
    parse_nvdisasm,
    parse_sass,
    step_costs,
    step_loop,
)

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


# A chunked scan in miniature: the source statements its branches point at, and an nvdisasm -gi
# listing (innermost location first, then the call it was inlined through; labels as targets).
SOURCE = """def kernel():
    for t0 in range(0, T, BLOCK_M):
        _block_logits(q)
        while done == 0:
            lse = _chunk_softmax(scr)
            acc = _window_sums(acc, 0, nq, x)
            new, ex = _slot_rule(key)
            for s in range(verified, stop):
                lse1 = _chunk_softmax(scr)
def helpers():
    for i in range(i0, i1):
    while pending > 0:
    for c0 in range(0, R_PAD, BLOCK_M):
    got, bad = _slot_pass(key)
"""


def listing(src: str, peeled: bool = False) -> str:
    at = lambda line, call=None: (  # noqa: E731
        f'\t//## File "{src}", line {line}'
        + (f' inlined at "{src}", line {call}\n\t//## File "{src}", line {call}' if call else "")
    )
    rows = [  # (address, location, instruction)
        (0x00, at(2), "MOV R0, R1"),
        (0x10, at(13, 3), "FADD R1, R1, R2"),  # the block logits' tiles: 2
        (0x20, at(13, 3), "@!P0 BRA `(.L_x_0)"),
        (0x30, at(13, 5), "FMNMX R3, R3, R4, !PT"),  # the round: softmax tiles, 2
        (0x40, at(13, 5), "@!P0 BRA `(.L_x_1)"),
        (0x50, at(11, 6), "FADD R5, R5, R6"),  # the round's queries in _window_sums: 32
        (0x60, at(11, 6), "@!P0 BRA `(.L_x_2)"),
        *([(0x68, at(13, 14), "FMUL R9, R9, R9")] if peeled else []),  # a pass, peeled
        (0x70, at(12, 7), "SHFL.BFLY PT, R7, R7, 0x1, 0x1f"),  # the slot rule's pass
        (0x80, at(12, 7), "@P0 BRA `(.L_x_3)"),
        (0x90, at(4), "@P1 BRA `(.L_x_1)"),  # the next round
        (0xA0, at(13, 9), "FMNMX R8, R8, R9, !PT"),  # a one-query step: softmax tiles, 2
        (0xB0, at(13, 9), "@!P0 BRA `(.L_x_4)"),
        (0xC0, at(8), "@P0 BRA `(.L_x_4)"),
        (0xD0, at(4), "@P2 BRA `(.L_x_1)"),  # verification again after fallback steps
        (0xE0, at(2), "@P3 BRA `(.L_x_5)"),  # the next chunk
        (0xF0, at(2), "EXIT"),
    ]
    labels = {0x10: "0", 0x30: "1", 0x50: "2", 0x70: "3", 0xA0: "4", 0x00: "5"}
    out = []
    for addr, loc, ins in rows:
        if addr in labels:
            out.append(f".L_x_{labels[addr]}:")
        out.append(loc)
        out.append(f"        /*{addr:04x}*/                   {ins} ;")
    return "\n".join(out) + "\n"


def test_parse_nvdisasm(tmp_path):
    src = tmp_path / "kernel.py"
    src.write_text(SOURCE)
    instrs = parse_nvdisasm(listing(str(src)))
    assert len(instrs) == 16
    assert instrs[2][:3] == (0x20, "BRA", "0x10")  # the label became its address
    assert instrs[5][3] == ((str(src), 11), (str(src), 6))  # innermost first, then the call
    found = {(lp["first"], lp["last"]): (lp["stmt"], lp["caller"]) for lp in chunk_loops(instrs)}
    assert found[(0x50, 0x60)] == ("for i in range(i0, i1):", "acc = _window_sums(acc, 0, nq, x)")
    assert found[(0x00, 0xE0)] == ("for t0 in range(0, T, BLOCK_M):", "")
    assert len(found) == 9


def test_chunk_costs_count_executed_instructions(tmp_path):
    src = tmp_path / "kernel.py"
    src.write_text(SOURCE)
    costs = chunk_costs(parse_nvdisasm(listing(str(src))), {"BLOCK_M": 32, "G": 1, "num_warps": 4})
    # R_PAD = ρ (64) rounded up to L (32): 2 tiles; the round's queries: L = 32
    assert costs["round"]["by_class"] == {"alu": 2 + 32, "branch": 2 + 32 + 1 + 1, "shfl": 1}
    assert costs["step"]["by_class"] == {"alu": 2, "branch": 2 + 1}
    assert costs["exact_tie"]["by_class"] == {"shfl": 1, "branch": 1}
    # a chunk's own work: outside the verification loop (0x30-0xd0)
    assert costs["chunk"]["by_class"] == {"alu": 1 + 2, "branch": 2 + 1}
    lat = ASSUMPTIONS["latency"]
    assert costs["step"]["cycles"] == (5, 2 * lat["alu"] + 3 * lat["branch"])


def test_a_peeled_slot_rule_pass_leaves_its_loop_to_exact_ties(tmp_path):
    src = tmp_path / "kernel.py"
    src.write_text(SOURCE)
    instrs = parse_nvdisasm(listing(str(src), peeled=True))
    costs = chunk_costs(instrs, {"BLOCK_M": 32, "G": 1, "num_warps": 4})
    assert costs["round"]["by_class"] == {"alu": 2 + 32 + 1, "branch": 2 + 32 + 1}
    assert costs["exact_tie"]["by_class"] == {"shfl": 1, "branch": 1}


def test_a_loop_without_a_known_trip_count_is_an_error(tmp_path):
    src = tmp_path / "kernel.py"
    src.write_text(SOURCE.replace("for c0 in range(0, R_PAD, BLOCK_M):", "for c0 in range(0, 7):"))
    with pytest.raises(ValueError, match="no trip count"):
        chunk_costs(parse_nvdisasm(listing(str(src))), {"BLOCK_M": 32, "G": 1, "num_warps": 4})
