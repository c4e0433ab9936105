"""The C table header is generated from minilora.tables and committed; regenerating it changes nothing."""
import importlib.util
import os

import numpy as np

from minilora import tables

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _gen_tables():
    spec = importlib.util.spec_from_file_location("gen_tables", os.path.join(ROOT, "csrc", "gen_tables.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_committed_header_equals_regenerated():
    with open(os.path.join(ROOT, "csrc", "minilora_tables.h"), encoding="utf-8") as f:
        committed = f.read()
    assert committed == _gen_tables().render(), "csrc/minilora_tables.h is stale: run python csrc/gen_tables.py"


def test_hex_literals_round_trip_to_the_same_bits():
    gen = _gen_tables()
    for table in (tables.NF4, tables.NF4_MID, tables.DYNAMIC_MAP):
        for value in table:
            literal = gen._literal(value)
            back = np.float32(float.fromhex(literal.rstrip("f")) if "0x" in literal else float(literal.rstrip("f")))
            assert back.view(np.uint32) == np.float32(value).view(np.uint32), literal
