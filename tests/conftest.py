import os

# No test touches the network: hub and dataset loaders must work from local files only.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"


@pytest.fixture(scope="session", autouse=True)
def _isolated_cache(tmp_path_factory):
    # Tests never write into the user's cache; the embedded-model test fills this one.
    os.environ["ATTNLAB_CACHE"] = str(tmp_path_factory.mktemp("attnlab-cache"))


@pytest.fixture(params=["tiny-gpt2", "tiny-llama"])
def tiny(request):
    from attnlab import load_backbone
    return load_backbone(request.param)


@pytest.fixture
def tiny_llama():
    from attnlab import load_backbone
    return load_backbone("tiny-llama")


def tiny_splits(bb, n_train=16, n_eval=6, max_length=400):
    from attnlab.data import build_splits
    return build_splits({"dataset_name": "arithmetic", "n_train": n_train, "n_eval": n_eval,
                         "max_length": max_length}, bb.tokenizer)


def logits_of(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits
