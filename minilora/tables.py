"""The constant tables of NF4, FP4 and double quantisation: their one home.

Every value is the float32 bit pattern bitsandbytes uses (``shared/spec/nf4.md`` §1, §5b), written as
hex so that nothing is computed at run time. The C header ``csrc/minilora_tables.h`` is generated from
this module by ``csrc/gen_tables.py``; ``tests/test_tables.py`` regenerates it and diffs.

How the NF4 values were derived (QLoRA paper, Dettmers et al. 2023, §3) is in ``docs/nf4.md``; the
derivation is never run here.
"""
import numpy as np

DEFAULT_BLOCKSIZE = 64
ALLOWED_BLOCKSIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)
NESTED_BLOCKSIZE = 256          # double quantisation: one nested absmax per 256 NF4 blocks
TINY_HEX = 0x006CE3EE           # float32 1e-38 (subnormal): the floor of a block's absmax
ZERO_CODE = 7                   # the NF4 code of 0.0, also the padding nibble of an odd length
# Nibble order: flat element 2k goes in the HIGH nibble of byte k, element 2k+1 in the low nibble.


def _f32(hex_words):
    """Turn a string of space-separated float32 bit patterns into a read-only float32 array."""
    bits = np.array([int(h, 16) for h in hex_words.split()], dtype=np.uint32)
    out = bits.view(np.float32)
    out.setflags(write=False)
    return out


# NF4 values, index = stored code. Code 0 is -1.0, code 7 is exactly 0.0, code 15 is +1.0.
NF4 = _f32(
    "bf800000 bf3239b1 bf066b30 beca32a0 be91a24d be3d353f bdba7871 00000000"
    " 3da2faff 3e24cae3 3e7c04dd 3ead033a 3ee1a4b8 3f1007ab 3f3913b3 3f800000"
)

# Decision bounds of bitsandbytes' CPU quantiser: float32((NF4[i] + NF4[i+1]) / 2).
NF4_MID = _f32(
    "bf591cd8 bf1c5270 beeb8480 beadea76 be703cec be0d38bc bd3a7871 3d22faff"
    " 3df64862 3e5067e0 3e9582d4 3ec753f9 3f006d04 3f248daf 3f5c89da"
)

# bitsandbytes' CUDA kernel writes its bounds as decimal literals; four land 1 ulp away (0, 8, 12, 14).
NF4_MID_CUDA = _f32(
    "bf591cd9 bf1c5270 beeb8480 beadea76 be703cec be0d38bc bd3a7871 3d22faff"
    " 3df64863 3e5067e0 3e9582d4 3ec753f9 3f006d03 3f248daf 3f5c89d9"
)

# FP4 (bitsandbytes "fp4"): bit 3 is the sign. = [0, 1/16, 8, 12, 4, 6, 2, 3, 0, -1/16, ...] / 12.
FP4 = _f32(
    "00000000 3baaaaab 3f2aaaab 3f800000 3eaaaaab 3f000000 3e2aaaab 3e800000"
    " 00000000 bbaaaaab bf2aaaab bf800000 beaaaaab bf000000 be2aaaab be800000"
)

# The 8-bit signed dynamic map of double quantisation, ascending. DYN[0] = -0.99296875,
# DYN[127] = 0.0 (the spec text says 128; bitsandbytes and the hex file agree on 127), DYN[255] = 1.0.
DYNAMIC_MAP = _f32(
    "bf7e3333 bf7a999a bf770000 bf736666 bf6fcccd bf6c3333 bf68999a bf650000"
    " bf616666 bf5dcccd bf5a3333 bf56999a bf530000 bf4f6666 bf4bcccd bf483333"
    " bf44999a bf410000 bf3d6666 bf39cccd bf363334 bf32999a bf2f0000 bf2b6666"
    " bf27cccd bf243334 bf20999a bf1d0000 bf196666 bf15cccd bf123334 bf0e999a"
    " bf0b0000 bf076666 bf03cccc bf003333 bef93332 bef20000 beeacccc bee3999a"
    " bedc6666 bed53333 bece0000 bec6cccc bebf999a beb86666 beb13333 beaa0000"
    " bea2cccc be9b999a be946666 be8d3334 be860000 be7d9999 be6f3333 be60cccd"
    " be526666 be440000 be35999a be273333 be18cccd be0a6666 bdf80000 bddb3334"
    " bdc9eb85 bdc428f7 bdbe6667 bdb8a3d7 bdb2e148 bdad1eb8 bda75c2a bda1999a"
    " bd9bd70a bd96147b bd9051eb bd8a8f5d bd84cccd bd7e147b bd728f5d bd670a3d"
    " bd5b851f bd500000 bd447ae1 bd38f5c3 bd2d70a3 bd21eb85 bd166667 bd0ae148"
    " bcfeb852 bce7ae15 bcd0a3d7 bcb9999a bca28f5d bc8b851f bc68f5c3 bc3ae148"
    " bc1f3b64 bc160418 bc0ccccd bc039581 bbf4bc6a bbe24dd3 bbcfdf3b bbbd70a4"
    " bbab020d bb989374 bb8624dd bb676c8a bb428f5c bb1db22d baf1a9fc baa7ef9d"
    " ba7765ff ba59e83e ba3c6a80 ba1eecc1 ba016f01 b9c7e283 b98ce705 b923d70b"
    " b8ba1f4b b88aefb3 b8378034 b7b24206 b70205ff b65a1a94 b513a3b7 00000000"
    " 3513a3b7 365a1a94 370205ff 37b24206 38378034 388aefb3 38ba1f4b 3923d70b"
    " 398ce705 39c7e283 3a016f01 3a1eecc1 3a3c6a80 3a59e83e 3a7765ff 3aa7ef9d"
    " 3af1a9fc 3b1db22d 3b428f5c 3b676c8a 3b8624dd 3b989374 3bab020d 3bbd70a4"
    " 3bcfdf3b 3be24dd3 3bf4bc6a 3c039581 3c0ccccd 3c160418 3c1f3b64 3c3ae148"
    " 3c68f5c3 3c8b851f 3ca28f5d 3cb9999a 3cd0a3d7 3ce7ae15 3cfeb852 3d0ae148"
    " 3d166667 3d21eb85 3d2d70a3 3d38f5c3 3d447ae1 3d500000 3d5b851f 3d670a3d"
    " 3d728f5d 3d7e147b 3d84cccd 3d8a8f5d 3d9051eb 3d96147b 3d9bd70a 3da1999a"
    " 3da75c2a 3dad1eb8 3db2e148 3db8a3d7 3dbe6667 3dc428f7 3dc9eb85 3ddb3334"
    " 3df80000 3e0a6666 3e18cccd 3e273333 3e35999a 3e440000 3e526666 3e60cccd"
    " 3e6f3333 3e7d9999 3e860000 3e8d3334 3e946666 3e9b999a 3ea2cccc 3eaa0000"
    " 3eb13333 3eb86666 3ebf999a 3ec6cccc 3ece0000 3ed53333 3edc6666 3ee3999a"
    " 3eeacccc 3ef20000 3ef93332 3f003333 3f03cccc 3f076666 3f0b0000 3f0e999a"
    " 3f123334 3f15cccd 3f196666 3f1d0000 3f20999a 3f243334 3f27cccd 3f2b6666"
    " 3f2f0000 3f32999a 3f363334 3f39cccd 3f3d6666 3f410000 3f44999a 3f483333"
    " 3f4bcccd 3f4f6666 3f530000 3f56999a 3f5a3333 3f5dcccd 3f616666 3f650000"
    " 3f68999a 3f6c3333 3f6fcccd 3f736666 3f770000 3f7a999a 3f7e3333 3f800000"
)

TINY = np.array([TINY_HEX], dtype=np.uint32).view(np.float32)[0]
