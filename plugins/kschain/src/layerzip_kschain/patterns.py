"""Kronecker-sparse patterns and chains of them.

A factor with pattern (a, b, c, d) is an (a·b·d) × (a·c·d) matrix with support I_a ⊗ 1_{b×c} ⊗ I_d:
a·d dense blocks of b×c. Block (α, δ) holds the entries at rows α·b·d + β·d + δ and columns
α·c·d + γ·d + δ (β < b, γ < c) — interleaved, not contiguous, whenever d > 1.

Chains are listed in the order they are applied: W ≈ K_L ⋯ K_1, so ``patterns[0]`` acts on the
input first. The square dyadic butterfly of size 2ⁿ is (2^{ℓ-1}, 2, 2, 2^{n-ℓ}) for ℓ = 1 … n.
"""

from __future__ import annotations

import math
from dataclasses import dataclass


class PatternError(ValueError):
    """A pattern or chain that cannot be built; the message says which factor and why."""


@dataclass(frozen=True)
class Pattern:
    a: int
    b: int
    c: int
    d: int

    def __post_init__(self):
        for field, value in zip("abcd", (self.a, self.b, self.c, self.d)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise PatternError(f"pattern {self.as_list()}: {field} must be a positive "
                                   f"integer, got {value!r}")

    @classmethod
    def of(cls, value) -> Pattern:
        if isinstance(value, Pattern):
            return value
        try:
            a, b, c, d = value
        except (TypeError, ValueError):
            raise PatternError(f"a pattern is four positive integers [a, b, c, d], "
                               f"got {value!r}") from None
        return cls(a, b, c, d)

    @property
    def rows(self) -> int:
        return self.a * self.b * self.d

    @property
    def cols(self) -> int:
        return self.a * self.c * self.d

    @property
    def num_blocks(self) -> int:
        return self.a * self.d

    @property
    def nnz(self) -> int:
        return self.a * self.b * self.c * self.d

    @property
    def density(self) -> float:
        return 1.0 / (self.a * self.d)

    def as_list(self) -> list[int]:
        return [self.a, self.b, self.c, self.d]

    def __str__(self) -> str:
        return f"({self.a},{self.b},{self.c},{self.d})"


def check_chain(patterns) -> list[Pattern]:
    """Patterns as Pattern objects, each consecutive pair chaining (input size of factor ℓ+1 =
    output size of factor ℓ); a PatternError names the first pair that does not."""
    pats = [Pattern.of(p) for p in patterns]
    if not pats:
        raise PatternError("a chain needs at least one pattern")
    for i, (p, q) in enumerate(zip(pats, pats[1:]), start=1):
        if q.cols != p.rows:
            raise PatternError(
                f"factor {i + 1} {q} takes inputs of size a·c·d = {q.cols}, but factor {i} {p} "
                f"outputs size a·b·d = {p.rows}: consecutive patterns must chain")
    return pats


def compose(first: Pattern, second: Pattern) -> Pattern | None:
    """The KS pattern of ``second @ first`` (first applied first) when the product is itself
    Kronecker-sparse in the chainable way the closed-form fit needs, else None.

    With x = a₂/a₁ and y = d₁/d₂ the pair chains with inner rank r when b₁ = x·r and c₂ = r·y;
    the product is then (a₁, x·b₂, c₁·y, d₂) and each of its blocks splits into x·y
    rank-r pieces (see fit.project_pair)."""
    if second.cols != first.rows or second.a % first.a or first.d % second.d:
        return None
    x, y = second.a // first.a, first.d // second.d
    if first.b % x:
        return None
    r = first.b // x
    if second.c != r * y:
        return None
    return Pattern(first.a, x * second.b, first.c * y, second.d)


def inner_rank(first: Pattern, second: Pattern) -> int:
    return first.b // (second.a // first.a)


def product_pattern(patterns) -> Pattern:
    """The pattern of the whole chain's product; PatternError when some split is not
    chainable (the closed form then does not apply: use init 'random')."""
    pats = check_chain(patterns)
    if len(pats) == 1:
        return pats[0]
    s = len(pats) // 2
    left, right = product_pattern(pats[:s]), product_pattern(pats[s:])
    out = compose(left, right)
    if out is None:
        raise PatternError(
            f"patterns {[str(p) for p in pats[:s]]} then {[str(p) for p in pats[s:]]} do not "
            f"compose into a Kronecker-sparse product (need a₂ divisible by a₁, d₁ by d₂, "
            f"b₁ = (a₂/a₁)·r and c₂ = r·(d₁/d₂) for one rank r)")
    return out


def butterfly_chain(size: int) -> list[Pattern]:
    """The square dyadic butterfly of size N = 2ⁿ: factor ℓ = (2^{ℓ-1}, 2, 2, 2^{n-ℓ})."""
    if size < 2 or size & (size - 1):
        raise PatternError(f"the dyadic butterfly needs a power of two ≥ 2, got {size}")
    n = size.bit_length() - 1
    return [Pattern(2 ** (l - 1), 2, 2, 2 ** (n - l)) for l in range(1, n + 1)]


def rank_chain(bs, cs, rank: int = 1) -> list[Pattern]:
    """The rank-r chain for an m×n weight with m = ∏ bs, n = ∏ cs (same length L).

    Factor ℓ maps the index (i₁…i_{ℓ-1}, ρ_{ℓ-1}, j_ℓ, j_{ℓ+1}…j_L) to (i₁…i_ℓ, ρ_ℓ, j_{ℓ+1}…j_L):
    pattern (∏_{k<ℓ} b_k, b_ℓ·r, r·c_ℓ, ∏_{k>ℓ} c_k), with no rank index before the first factor
    or after the last. For L = 2 and b = c = √N this is the Monarch structure."""
    bs, cs = list(bs), list(cs)
    if len(bs) != len(cs) or not bs:
        raise PatternError(f"need as many row as column divisors, got {bs} and {cs}")
    if rank < 1:
        raise PatternError(f"rank must be ≥ 1, got {rank}")
    L = len(bs)
    out = []
    for l in range(L):
        r_in = rank if l > 0 else 1
        r_out = rank if l < L - 1 else 1
        out.append(Pattern(math.prod(bs[:l]), bs[l] * r_out, r_in * cs[l], math.prod(cs[l + 1:])))
    return out


def chain_params(patterns) -> int:
    return sum(Pattern.of(p).nnz for p in patterns)


def _ordered_factorizations(n: int, parts: int, limit: int = 5000):
    """Ordered tuples of `parts` positive integers whose product is n (at most `limit`)."""
    if parts == 1:
        yield (n,)
        return
    count = 0
    for d in range(1, n + 1):
        if n % d:
            continue
        for rest in _ordered_factorizations(n // d, parts - 1, limit):
            yield (d, *rest)
            count += 1
            if count >= limit:
                return


def _padding_candidates(size: int) -> list[int]:
    """The size itself and the next multiples of 2, 4, 8, … up to 12.5% larger: sizes that
    factor well when the original is prime or nearly so."""
    out = {size}
    k = 1
    while 2 ** k <= size:
        padded = -(-size // 2 ** k) * 2 ** k
        if padded <= size * 1.125:
            out.add(padded)
        k += 1
    return sorted(out)


@dataclass(frozen=True)
class ChainChoice:
    patterns: tuple[Pattern, ...]
    out_padded: int
    in_padded: int
    params: int
    bs: tuple[int, ...]
    cs: tuple[int, ...]

    def with_rank(self, rank: int) -> ChainChoice:
        pats = rank_chain(self.bs, self.cs, rank)
        return ChainChoice(tuple(pats), self.out_padded, self.in_padded, chain_params(pats),
                           self.bs, self.cs)

    def max_useful_rank(self) -> int | None:
        """For two factors, the rank at which every sub-block is exact (min(b₂, c₁)); None for
        longer chains (no simple bound)."""
        return min(self.bs[1], self.cs[0]) if len(self.bs) == 2 else None

    def padding(self, out_features: int, in_features: int) -> dict:
        return {"rows": self.out_padded - out_features, "cols": self.in_padded - in_features}


def best_chain(out_features: int, in_features: int, num_factors: int = 2, rank: int = 1,
               max_params: int | None = None, divisors: str = "balanced") -> ChainChoice:
    """The rank-r chain of ``num_factors`` factors for an out×in weight: divisors b_ℓ, c_ℓ ≥ 2 as
    balanced as possible (b_ℓ ≈ m^{1/L}, the Monarch choice — fewest parameters alone would pick
    degenerate, nearly low-rank chains), fewest parameters among equally balanced ones. Padded
    sizes (next multiples of 2ᵏ, ≤ 12.5% larger) compete with a penalty, so a prime or
    badly-factoring size gets padded and a well-factoring one does not. With ``max_params``,
    chains above it are skipped. ``divisors="fewest_params"`` ranks by parameters first (then
    balance): the literal "fewest parameters" rule, which favours b₁ = 2-style chains."""
    if divisors not in ("balanced", "fewest_params"):
        raise PatternError(f"divisors must be 'balanced' or 'fewest_params', got {divisors!r}")
    if num_factors < 1:
        raise PatternError(f"num_factors must be ≥ 1, got {num_factors}")
    best: tuple | None = None
    L = num_factors
    for m in _padding_candidates(out_features):
        for n in _padding_candidates(in_features):
            pad_penalty = 2 * L * (math.log(m / out_features) + math.log(n / in_features))
            for bs in _ordered_factorizations(m, L):
                if L > 1 and min(bs) < 2:
                    continue
                for cs in _ordered_factorizations(n, L):
                    if L > 1 and min(cs) < 2:
                        continue
                    pats = rank_chain(bs, cs, rank)
                    params = chain_params(pats)
                    if max_params is not None and params > max_params:
                        continue
                    spread = sum(abs(math.log(b) - math.log(m) / L) for b in bs) + \
                        sum(abs(math.log(c) - math.log(n) / L) for c in cs)
                    balance = round(spread + pad_penalty, 9)
                    key = (balance, params) if divisors == "balanced" else \
                        (params + round(pad_penalty, 9), balance)
                    if best is None or key < best[0]:
                        best = (key, pats, m, n, bs, cs)
    if best is None:
        raise PatternError(
            f"no {num_factors}-factor chain of rank {rank} for {out_features}×{in_features} "
            f"with every divisor ≥ 2 (even after padding by ≤ 12.5%)"
            + (f" within {max_params} parameters" if max_params is not None else "")
            + ": use fewer factors or explicit patterns")
    _, pats, m, n, bs, cs = best
    return ChainChoice(tuple(pats), m, n, chain_params(pats), tuple(bs), tuple(cs))


__all__ = ["ChainChoice", "Pattern", "PatternError", "best_chain", "butterfly_chain",
           "chain_params", "check_chain", "compose", "inner_rank", "product_pattern",
           "rank_chain"]
