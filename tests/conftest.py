import pytest

from layerzip.models import default_text, load_model, minilm_l6, text_windows


@pytest.fixture(scope="session")
def smollm2():
    """The real SmolLM2-135M-Instruct (fp32), loaded once per session; tests deep-copy it."""
    return load_model("smollm2")


@pytest.fixture(scope="session")
def smollm2_windows(smollm2):
    """Few tokens on purpose (CI has 2 cores): 2×128 calibration, 2×128 held-out."""
    text = default_text()
    tok = smollm2.tokenizer
    return text_windows(tok, text, 128, 2), text_windows(tok, text, 128, 2, skip_windows=2)


@pytest.fixture(scope="session")
def minilm():
    return minilm_l6()
