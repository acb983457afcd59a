import pytest
import torch

from layerzip_kschain import (
    Pattern,
    PatternError,
    best_chain,
    butterfly_chain,
    chain_dense,
    check_chain,
    compose,
    factor_dense,
    factor_from_dense,
    product_pattern,
    rank_chain,
)


def explicit_factor(blocks, p):
    """Entry by entry from the definition: block α·d + δ at rows α·b·d + β·d + δ, columns
    α·c·d + γ·d + δ."""
    w = torch.zeros(p.rows, p.cols, dtype=blocks.dtype)
    for al in range(p.a):
        for de in range(p.d):
            for be in range(p.b):
                for ga in range(p.c):
                    w[al * p.b * p.d + be * p.d + de, al * p.c * p.d + ga * p.d + de] = \
                        blocks[al * p.d + de, be, ga]
    return w


@pytest.mark.parametrize("abcd", [(1, 3, 4, 1), (2, 3, 4, 1), (1, 3, 4, 5), (2, 3, 4, 5),
                                  (3, 2, 2, 2), (1, 1, 1, 1)])
def test_dense_places_blocks_at_interleaved_positions(abcd):
    p = Pattern(*abcd)
    blocks = torch.randn(p.num_blocks, p.b, p.c, generator=torch.Generator().manual_seed(0))
    dense = factor_dense(blocks, p)
    assert torch.equal(dense, explicit_factor(blocks, p))
    assert torch.equal(factor_from_dense(dense, p), blocks)
    assert int((dense != 0).sum()) == p.nnz and p.density == pytest.approx(1 / (p.a * p.d))


def test_equal_blocks_give_the_kronecker_support_formula():
    p = Pattern(3, 2, 4, 5)
    block = torch.randn(p.b, p.c)
    dense = factor_dense(block.expand(p.num_blocks, -1, -1), p)
    assert torch.equal(dense, torch.kron(torch.kron(torch.eye(p.a), block), torch.eye(p.d)))


@pytest.mark.parametrize("bad, words", [((0, 1, 1, 1), "a must be a positive integer"),
                                         ((1, -2, 1, 1), "b must be"), ((1, 1, 1.5, 1), "c must"),
                                         ((1, 2, 3), "four positive integers")])
def test_pattern_validation(bad, words):
    with pytest.raises(PatternError, match=words):
        Pattern.of(bad)


def test_chain_validation_names_the_pair():
    with pytest.raises(PatternError, match=r"factor 2 \(2,2,3,1\) takes inputs of size a·c·d = 6, "
                                           r"but factor 1 \(1,2,2,2\) outputs size a·b·d = 4"):
        check_chain([[1, 2, 2, 2], [2, 2, 3, 1]])
    with pytest.raises(PatternError, match="at least one"):
        check_chain([])


def test_butterfly_chain():
    pats = butterfly_chain(16)
    assert [p.as_list() for p in pats] == [[1, 2, 2, 8], [2, 2, 2, 4], [4, 2, 2, 2], [8, 2, 2, 1]]
    assert product_pattern(pats) == Pattern(1, 16, 16, 1)
    with pytest.raises(PatternError, match="power of two"):
        butterfly_chain(12)


def test_rank_chain_shapes_and_monarch():
    pats = rank_chain([64, 64], [64, 64], 1)
    assert [p.as_list() for p in pats] == [[1, 64, 64, 64], [64, 64, 64, 1]]
    pats = rank_chain([2, 3, 4], [5, 2, 3], 3)
    check_chain(pats)
    assert (pats[0].cols, pats[-1].rows) == (30, 24)
    assert product_pattern(pats) == Pattern(1, 24, 30, 1)


def test_compose_rejects_non_chainable_pairs():
    assert compose(Pattern(2, 2, 2, 1), Pattern(1, 2, 2, 2)) is None  # reversed butterfly
    with pytest.raises(PatternError, match="do not compose"):
        product_pattern([[2, 2, 2, 1], [1, 2, 2, 2]])


def test_best_chain_balances_and_pads_only_when_needed():
    c = best_chain(4096, 4096, 2, 1)
    assert [p.as_list() for p in c.patterns] == [[1, 64, 64, 64], [64, 64, 64, 1]]
    assert c.padding(4096, 4096) == {"rows": 0, "cols": 0}
    c = best_chain(577, 1536, 2, 1)  # 577 is prime
    assert c.out_padded > 577 and c.padding(577, 1536)["rows"] == c.out_padded - 577
    assert c.patterns[0].cols == 1536 and c.patterns[-1].rows == c.out_padded
    assert all(min(p.b, p.c) >= 2 for p in c.patterns)
    # the rank widens the inner sizes, the chain stays a chain
    c4 = c.with_rank(4)
    check_chain(c4.patterns)
    assert c4.params > c.params


def test_chain_dense_is_the_product():
    pats = rank_chain([2, 3], [3, 2], 2)
    g = torch.Generator().manual_seed(1)
    fs = [torch.randn(p.num_blocks, p.b, p.c, generator=g) for p in pats]
    expected = explicit_factor(fs[1], pats[1]) @ explicit_factor(fs[0], pats[0])
    torch.testing.assert_close(chain_dense(fs, pats), expected)


def test_fewest_params_divisors_rank_by_parameters_first():
    balanced = best_chain(1536, 576, 2, 4)
    fewest = best_chain(1536, 576, 2, 4, divisors="fewest_params")
    assert fewest.params < balanced.params
    assert min(fewest.bs + fewest.cs) == 2  # the degenerate choice this option exists to show
    with pytest.raises(PatternError, match="divisors must be"):
        best_chain(16, 16, 2, 1, divisors="smallest")
