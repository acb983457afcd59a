from layerzip.testing import ApproximatorConformance


class TestPQKeyValue(ApproximatorConformance):
    method = "pq_kv"
    # 48×32: r ≤ 32 keys, 64 signed keys; more retrieved keys → lower output error
    budgets = [{"expected_K": 2, "energy_keep": 1.0}, {"expected_K": 8, "energy_keep": 1.0},
               {"expected_K": 32, "energy_keep": 1.0, "values_index_type": "SQ",
                "sq_type": "QT_fp16"}]
    full_budget = None  # quantized keys never make it exact; see test_pqkv.py for the identity
    bad_params = [{"m_pq_keys": 5}, {"nbits_keys": 8, "energy_keep": 0.5},
                  {"npq_M_keys": 4}, {"expected_K": 40}, {"nlist": 100},
                  {"nlist": 4, "nprobe": 8}, {"nprobe": 2}, {"use_gpu": True},
                  {"values_index_type": "SQ", "m_pq_vals": 4},
                  {"values_index_type": "PQ", "sq_type": "QT_8bit"},
                  {"backend": "nanopq", "m_pq_keys": 4}, {"retrieval": "nearest"},
                  {"energy_keep": 0}]
    monotone_slack = 1e-3
