"""Shared fixtures. No test touches the network: the Hub is offline and its cache lives in a temporary folder."""

from __future__ import annotations

import os
import tempfile

# One folder for what the session leaves outside pytest's own tmp_path folders, removed when the session ends
# (pytest_unconfigure below): the Hugging Face home, torch's `torchinductor` cache (timm imports torch._dynamo,
# which makes it), and the session's temporary folder, where multiprocessing puts the loader workers' `pymp-*` and
# the tests' subprocesses their temporary files. pytest's own tmp_path folders stay where pytest keeps them (the
# last three sessions, for looking at a failure).
os.environ.setdefault("PYTEST_DEBUG_TEMPROOT", tempfile.gettempdir())
_SESSION = tempfile.mkdtemp(prefix="lrc-test-")
_HF_HOME = os.path.join(_SESSION, "hf")
_TMP = os.path.join(_SESSION, "tmp")
os.makedirs(_TMP)
os.environ["TMPDIR"] = tempfile.tempdir = _TMP
os.environ["TORCHINDUCTOR_CACHE_DIR"] = os.path.join(_SESSION, "torchinductor")
# Before anything imports huggingface_hub, which reads these once.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_HOME"] = _HF_HOME
os.environ["HF_HUB_CACHE"] = os.path.join(_HF_HOME, "hub")
os.environ.setdefault("OMP_NUM_THREADS", "2")

import shutil  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

# Without a GPU, Triton runs kernels on CPU tensors in its interpreter, so that the fused low-rank kernel's tests
# (tests/layers/kernels) run here too. Set before anything imports triton (timm does): the interpreter decides when
# triton.language is imported. `import torch` alone does not import triton.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

sys.path.insert(0, str(Path(__file__).parent))  # tests/helpers.py, digits.py, hf_fixtures.py

from helpers import make_tiny_vit  # noqa: E402


def pytest_unconfigure(config):
    shutil.rmtree(_SESSION, ignore_errors=True)


@pytest.fixture(scope="session")
def tiny_vit_folder(tmp_path_factory) -> Path:
    """A tiny ViT saved in timm's Hub layout (config.json + model.safetensors), as timm's save_for_hf writes it."""
    from timm.models import save_for_hf

    folder = tmp_path_factory.mktemp("tiny_vit")
    save_for_hf(make_tiny_vit(), str(folder), safe_serialization=True)
    return folder


@pytest.fixture(scope="module")
def one_thread():
    """One torch thread for a module: on a shared, oversubscribed CPU, OpenMP barriers make small 2-thread
    kernels (SVDs, float64 LAPACK) crawl 10-50x."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def hub_cache(monkeypatch, tmp_path):
    """An empty Hugging Face cache folder for this test, and a function that puts a repo into it exactly as
    huggingface_hub lays out a download (refs/main -> snapshots/<commit>/<files>)."""
    from huggingface_hub import constants

    cache = tmp_path / "hf-cache"
    cache.mkdir()
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))

    def add(repo: str, files: dict[str, Path], commit: str = "0123456789abcdef0123456789abcdef01234567") -> str:
        root = cache / f"models--{repo.replace('/', '--')}"
        snapshot = root / "snapshots" / commit
        snapshot.mkdir(parents=True)
        for name, src in files.items():  # a name may hold a folder (1_Pooling/config.json)
            (snapshot / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(src, snapshot / name)
        (root / "refs").mkdir(exist_ok=True)
        (root / "refs" / "main").write_text(commit)
        return commit

    add.path = cache
    return add


@pytest.fixture(scope="session")
def digits_folder(tmp_path_factory):
    """`digits_folder(image_size, max_per_class)`: scikit-learn's digits as an ImageFolder (train/ and val/),
    written once per session for each size asked for."""
    from digits import write_digits_imagefolder

    written: dict[tuple[int, int | None], Path] = {}

    def get(image_size: int = 32, max_per_class: int | None = None) -> Path:
        key = (image_size, max_per_class)
        if key not in written:
            folder = tmp_path_factory.mktemp(f"digits{image_size}_{max_per_class or 'all'}")
            written[key] = write_digits_imagefolder(folder, image_size=image_size, max_per_class=max_per_class)
        return written[key]

    return get


@pytest.fixture(scope="session")
def bert_folder(tmp_path_factory) -> Path:
    """A tiny BERT sequence classifier with its tokenizer, in transformers' save_pretrained layout."""
    from hf_fixtures import write_tiny_bert

    return write_tiny_bert(tmp_path_factory.mktemp("bert") / "tiny-bert", head="sequence-classification")


@pytest.fixture
def fake_hub(monkeypatch):
    """The Hub at its network boundary: HfApi.whoami / create_repo / create_branch / upload_folder record what
    they would send (upload_folder: every file's bytes, at call time) instead of sending it. Online, signed in as
    'alice' with HF_TOKEN (the token file lies in the session's temporary HF_HOME, so there is no other);
    `fake_hub.fail[method] = exception` makes that call fail."""
    from huggingface_hub import CommitInfo, HfApi, constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setenv("HF_TOKEN", "hf_test_token")
    hub = type("FakeHub", (), {})()
    hub.calls, hub.uploaded, hub.fail = [], {}, {}

    def record(name):
        def method(self, *args, **kwargs):
            hub.calls.append((name, args, kwargs, self.token))
            if name in hub.fail:
                raise hub.fail[name]
            if name == "whoami":
                return {"name": "alice", "type": "user"}
            if name == "upload_folder":
                folder = Path(kwargs["folder_path"])
                hub.uploaded.update({p.relative_to(folder).as_posix(): p.read_bytes() for p in folder.rglob("*")
                                     if p.is_file()})
                return CommitInfo(commit_url=f"https://huggingface.co/{kwargs['repo_id']}/commit/abc1234",
                                  commit_message=kwargs["commit_message"], commit_description="", oid="abc1234")
            return None
        return method

    for name in ("whoami", "create_repo", "create_branch", "upload_folder"):
        monkeypatch.setattr(HfApi, name, record(name))
    return hub
