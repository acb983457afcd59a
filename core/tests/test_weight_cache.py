import gc

import torch

from layerzip import WeightCache


def counting_cache():
    calls = []

    def build(*tensors, scale=1):
        calls.append(len(tensors))  # not the tensors: that would keep them alive
        return [scale * t.sum().item() for t in tensors]

    return WeightCache(build), calls


def test_builds_once_per_version_of_every_tensor():
    cache, calls = counting_cache()
    w, b = torch.ones(4, 3), torch.ones(3)
    first = cache(w, b)
    assert cache(w, b) is first and len(calls) == 1
    with torch.no_grad():
        b.add_(1)  # an in-place update of a tensor other than the owner
    assert cache(w, b) == [12.0, 6.0] and len(calls) == 2
    w.data = torch.zeros(2, 2)  # new storage and shape behind the same tensor
    assert cache(w, b) == [0.0, 6.0] and len(calls) == 3
    assert cache(w, b, scale=2) == [0.0, 12.0] and len(calls) == 4  # params are part of it
    assert cache(w, b, scale=2) == [0.0, 12.0] and len(calls) == 4
    assert len(cache) == 1  # one entry per owner


def test_entries_follow_the_owner_not_its_id():
    # an entry goes when its owner is collected, so a new tensor that gets the dead one's id
    # and address is built afresh instead of inheriting the dead one's result
    cache, calls = counting_cache()
    w = torch.ones(8)
    cache(w)
    assert len(cache) == 1
    del w
    gc.collect()
    assert len(cache) == 0
    for _ in range(20):  # whatever the allocator hands out next
        assert cache(torch.full((8,), 2.0)) == [16.0]
