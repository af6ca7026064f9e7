"""tests/cuda_sass.py, the check .ci/run applies to every sm_90a build, on SASS written to show
each case: the hazard it exists for (a k-block's decode overwriting the A registers of the
wgmmas still in flight, reached through the loop's back edge), and the shapes that are fine."""

from cuda_sass import functions, overwrites, problems, written_registers

LOOP = """
        .text.w4_wgmma_demo:
.L_x_1:
        /*0000*/                   LDS.128 R8, [R8+0x2000] ;
        /*0010*/                   LOP3.LUT R{decoded}, R8, 0xf000f, RZ, 0xc0, !PT ;
        /*0020*/                   WARPGROUP.DEPBAR.LE gsb0, 0x0 ;
        /*0030*/                   HMUL2 R{late}, R9, R10.H0_H0 ;
        /*0040*/                   WARPGROUP.ARRIVE ;
        /*0050*/                   HGMMA.64x64x16.F32 R24, R56, gdesc[UR8], R24, gsb0 ;
        /*0060*/              @!P0 BRA `(.L_x_1) ;
        /*0070*/                   WARPGROUP.DEPBAR.LE gsb0, 0x0 ;
        /*0080*/                   FADD R{epilogue}, R24, R25 ;
        /*0090*/                   EXIT ;
"""


def _check(sass: str = LOOP, **registers: int):
    (name, (instructions, labels)), = functions(sass.format(**registers)).items()
    return name, overwrites(instructions, labels)


def test_a_write_of_an_in_flight_a_register_through_the_back_edge_is_found():
    name, found = _check(decoded=57, late=72, epilogue=100)
    assert name == "w4_wgmma_demo"
    assert [o.writer for o in found] == ["LOP3.LUT R57, R8, 0xf000f, RZ, 0xc0, !PT"]


def test_bfloat16_hgmmas_are_read_too():
    bf16 = LOOP.replace("HGMMA.64x64x16.F32 ", "HGMMA.64x64x16.F32.BF16 ")
    assert [o.writer for o in _check(bf16, decoded=57, late=72, epilogue=100)[1]] == ["LOP3.LUT R57, R8, 0xf000f, RZ, 0xc0, !PT"]


def test_a_write_of_an_in_flight_accumulator_is_found():
    assert [o.writer for o in _check(decoded=40, late=72, epilogue=100)[1]] == ["LOP3.LUT R40, R8, 0xf000f, RZ, 0xc0, !PT"]


def test_writes_after_the_wait_or_to_other_registers_are_fine():
    assert _check(decoded=72, late=56, epilogue=24)[1] == []


def test_a_cubin_counts_its_writes_and_with_require_hgmma_the_lack_of_any_hgmma():
    """.ci/run requires warpgroup MMAs in the sm_90a builds of a source with the wgmma kernel: a
    build for plain sm_90, whose wrappers trap, would otherwise pass with nothing checked."""
    hazard, fine = LOOP.format(decoded=57, late=72, epilogue=100), LOOP.format(decoded=72, late=56, epilogue=24)
    without = fine.replace("HGMMA.64x64x16.F32 R24, R56, gdesc[UR8], R24, gsb0", "HMMA.16816.F32 R24, R56, R8, R24")
    assert (problems("hazard", hazard), problems("fine", fine, require_hgmma=True)) == (1, 0)
    assert (problems("without", without), problems("without", without, require_hgmma=True)) == (0, 1)


def test_destinations_span_the_registers_the_opcode_writes():
    assert written_registers("LDS.128 R8, [R8+0x2000]") == {8, 9, 10, 11}
    assert written_registers("IMAD.WIDE.U32 R18, R159, R8, RZ") == {18, 19}
    assert written_registers("CS2R R40, SRZ") == {40, 41}
    assert written_registers("@!P0 SHFL.BFLY PT, R5, R4, 0x1, 0x1f") == {5}
    assert written_registers("ISETP.GT.AND P0, PT, R16, R9, PT") == set()
    assert written_registers("STS [R3], R57") == set()
    assert written_registers("UMOV UR7, 0x40") == set()
