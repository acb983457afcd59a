from torch import nn

from layerzip.matching import Pattern, check_pattern


def test_pattern_kinds():
    lin = nn.Linear(2, 2)
    assert Pattern("h.0.mlp").matches("h.0.mlp", lin)
    assert not Pattern("h.0.mlp").matches("h.0.mlp.c_fc", lin)
    assert Pattern("*.mlp.*").matches("h.0.mlp.c_fc", lin)
    assert Pattern("re:h\\.\\d+\\.mlp\\..*").matches("h.12.mlp.c_fc", lin)
    assert not Pattern("re:h\\.\\d").matches("h.12", lin), "regex must fullmatch"
    assert Pattern("Linear").matches("anything", lin)
    assert Pattern("Module").matches("anything", lin), "class names come from the MRO"
    assert not Pattern("Conv1D").matches("anything", lin)


def test_check_pattern():
    assert check_pattern("re:a(") and "invalid regular expression" in check_pattern("re:a(")
    assert check_pattern("") and check_pattern("re:")
    assert check_pattern("layers.*.mlp") is None
